"""Shared test data for the pipeline and job tests: tiny images, input Parquet, the transformers oracle."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    """A loopback port nothing listens on now (for a server to take, or to find nothing there)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def good_rows(n: int, with_questions: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        q = ["What is in the image?", "How many shapes are there?", None][i % 3] if with_questions else None
        rows.append({"id": f"row-{i}", "image": png(20 + 7 * i, 30 + 3 * (i % 4), seed=i), "question": q})
    return rows


def write_parquet(path: str | Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


class Oracle:
    """transformers' processor + greedy generate on one row alone: the reference answer."""

    def __init__(self, checkpoint: str | Path, **image_settings):
        import torch
        from transformers import AutoProcessor, Idefics3ForConditionalGeneration

        torch.set_num_threads(1)
        self.processor = AutoProcessor.from_pretrained(str(checkpoint), **image_settings)
        self.model = Idefics3ForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def answer(self, image: bytes | list[bytes], question: str, max_new_tokens: int | None, system: str | None = None,
               allowed=None, counted: tuple[float, float] | None = None, **generate) -> tuple[str, int]:
        """`image`: one image's bytes, or a list of several (all before the question); `system`: a
        system turn first; `allowed`: the tokens allowed after the answer's tokens so far (a function
        of them); `counted`: vLLM's (presence, frequency) penalties (tests.fixtures.penalties);
        `generate`: more of generate's settings (repetition_penalty=...)."""
        new = self.new_tokens(image, question, max_new_tokens, system, allowed, counted, **generate)
        eos = set(self.model.generation_config.eos_token_id or [])
        n = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        return self.processor.decode(new[:n], skip_special_tokens=True).strip(), n

    def inputs(self, image: bytes | list[bytes], question: str, system: str | None = None) -> dict:
        """The reference processor's inputs for the row (input_ids: its prompt)."""
        images = image if isinstance(image, list) else [image]
        content = [{"type": "image", "image": Image.open(io.BytesIO(data))} for data in images]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}]
        if system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")

    def new_tokens(self, image: bytes | list[bytes], question: str, max_new_tokens: int | None,
                   system: str | None = None, allowed=None, counted: tuple[float, float] | None = None,
                   **generate) -> list[int]:
        """The tokens generate adds (as `answer`'s arguments), padding included."""
        import torch

        inputs = self.inputs(image, question, system)
        n = inputs["input_ids"].shape[1]
        if allowed is not None:
            generate["prefix_allowed_tokens_fn"] = lambda _, row: allowed(row[n:].tolist())
        if counted is not None:
            from tests.fixtures.penalties import counted_penalties
            from transformers import LogitsProcessorList
            generate["logits_processor"] = LogitsProcessorList([counted_penalties(n, *counted)])
        with torch.no_grad():
            if max_new_tokens is not None:          # None: the checkpoint's generation_config.json decides
                generate["max_new_tokens"] = max_new_tokens
            out = self.model.generate(**inputs, **{"do_sample": False, **generate})
        return out[0, n:].tolist()


def started_actors(class_name: str) -> int:
    """The actors of `class_name` started on this cluster so far, dead ones too (the state API needs the
    dashboard the tests leave out: the GCS's actor table)."""
    import ray

    return sum(a["ActorClassName"] == class_name for a in ray._private.state.actors().values())


@contextlib.contextmanager
def own_cluster(**init):
    """A local Ray cluster of the caller's own (`init`: more of ray.init's arguments), the one modules
    share (conftest.ray_cluster) shut first."""
    import ray

    ray.shutdown()
    ray.init(include_dashboard=False, logging_level="WARNING", **init)
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_with_fault(faults: dict[str, str]):
    """A local Ray cluster whose workers see the fault-injection variables `faults` (name -> spec)."""
    return own_cluster(num_cpus=4, runtime_env={"env_vars": faults})


@contextlib.contextmanager
def serve_folder(folder: str | Path, ranges: bool):
    """An HTTP server of `folder`'s files on loopback (yields its base URL). Python's http.server
    answers a ranged GET with the whole file; with `ranges`, it answers the range (206), as object
    stores, the Hugging Face Hub and most servers do."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            spec = self.headers.get("Range", "")
            path = Path(self.translate_path(self.path))
            if not (ranges and spec.startswith("bytes=") and path.is_file()):
                return super().do_GET()
            body = path.read_bytes()
            first, last = spec[len("bytes="):].split("-")
            first, last = int(first), min(int(last) if last else len(body) - 1, len(body) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            self.wfile.write(body[first:last + 1])

    class Server(ThreadingHTTPServer):
        request_queue_size = 64     # the default backlog (5) drops a stage's concurrent connects (1 s SYN retries)

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
