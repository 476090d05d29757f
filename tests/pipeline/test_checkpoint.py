"""pipeline.checkpoint.check_model on local folders and hub ids: what the driver refuses before any work
(URLs: test_s3)."""
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from model.files import CheckpointError
from pipeline.checkpoint import check_model
from tests.pipeline.helpers import free_port


def copy_without(checkpoint, tmp_path, *names: str):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(*names))
    return folder


REPO = Path(__file__).resolve().parents[2]


def test_a_whole_checkpoint_passes(checkpoint):
    check_model(str(checkpoint))
    check_model(f"file://{checkpoint}")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="the suite's offline hub (tests/conftest.py)")
def test_a_hub_id_the_driver_cannot_ask_about_is_left_to_the_actors(caplog):
    check_model("HuggingFaceTB/SmolVLM-256M-Instruct")      # offline, not cached here
    assert "not checked" in caplog.text and "HF_HUB_OFFLINE" in caplog.text


def hub_cache(root: Path, repo: str, checkpoint: Path) -> Path:
    """The hub cache's layout (models--owner--name/refs/main -> snapshots/<commit>/) holding `checkpoint`."""
    entry = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, entry / "snapshots" / commit)
    return root


def test_a_hub_id_is_checked_from_the_hub_cache(checkpoint, tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path, "owner/smolvlm", checkpoint)))
    check_model("owner/smolvlm")
    assert "not checked" not in caplog.text
    with pytest.raises(CheckpointError, match="'owner/smolvlm': cannot shard this model"):
        check_model("owner/smolvlm", tensor_parallel_size=5)


def test_a_hub_that_does_not_answer_is_given_up_at_once_for_the_cached_config(checkpoint, tmp_path):
    """No answer from the hub (here: nothing listens on its port) and HF_HUB_OFFLINE unset: the
    listing fails at once, and the hub cache's config.json is checked without the hub client's
    retries (~23 s before)."""
    port = free_port()
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="0",
               HF_HUB_CACHE=str(hub_cache(tmp_path, "owner/smolvlm", checkpoint)))
    check = ("import sys, time, httpx, huggingface_hub.hf_api\nfrom pipeline.checkpoint import check_model\n"
             "start = time.monotonic()\n"
             "try:\n    check_model(sys.argv[1], tensor_parallel_size=5)\nexcept Exception as e:\n    print(e)\n"
             "print(f'{time.monotonic() - start:.1f} s')")
    said = [subprocess.run([sys.executable, "-c", check, repo], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120).stdout.splitlines() for repo in ("owner/smolvlm", "owner/uncached")]
    assert "'owner/smolvlm': cannot shard this model" in said[0][0]
    assert len(said[1]) == 1                                    # nothing raised: left to the actors
    assert all(float(lines[-1].split()[0]) < 5 for lines in said), said


class StandInHub(BaseHTTPRequestHandler):
    """Answers as the hub does: the files and top-level listing of the repositories in `repos`
    (owner/name -> folder); 403 GatedRepo for an owner/gated, 404 RepoNotFound for any other."""
    repos: dict[str, Path] = {}

    def do_HEAD(self):
        path = self.path.split("?")[0].strip("/")
        if path.startswith("api/models/") and "/tree/" in path:
            repo = path[len("api/models/"):].split("/tree/")[0]
            if repo in self.repos:
                listing = [{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40}
                           for p in sorted(self.repos[repo].iterdir())]
                return self.answer(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})
        elif "/resolve/" in path:
            repo, name = path.split("/resolve/")[0], path.split("/")[-1]
            if repo in self.repos and (self.repos[repo] / name).is_file():
                body = (self.repos[repo] / name).read_bytes()
                return self.answer(200, body, {"X-Repo-Commit": "1" * 40, "ETag": f'"{len(body)}"'})
            if repo in self.repos:
                return self.answer(404, b"", {"X-Error-Code": "EntryNotFound"})
        gated = path.startswith("gated/") or "/gated/" in path
        self.answer(403 if gated else 404, b"", {"X-Error-Code": "GatedRepo" if gated else "RepoNotFound"})

    def answer(self, status: int, body: bytes, headers: dict):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body)), "X-Error-Message": "stand-in hub"}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture()
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    StandInHub.repos = {}


def hub_env(hub: str, tmp_path: Path) -> dict:
    return dict(os.environ, HF_ENDPOINT=hub, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "cache"))


@pytest.mark.parametrize("model,said", [
    ("owner/mistyped", "no such checkpoint folder, nor a repository on the hub"),
    ("owner/gated", "a gated hub repository"),
])
def test_a_hub_id_the_hub_does_not_have_fails_the_job_at_once(hub, tmp_path, model, said):
    done = subprocess.run([sys.executable, "-m", "jobs.caption", "--model", model, "--output", str(tmp_path / "out")],
                          cwd=REPO, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_hub_repository_without_what_the_actors_read_is_named(hub, checkpoint, tmp_path):
    """The repository's listing must hold tokenizer.json and safetensors weights, as a folder must."""
    pickled = copy_without(checkpoint, tmp_path / "pickled", "*.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    StandInHub.repos = {"owner/whole": checkpoint, "owner/pickled": pickled,
                        "owner/untokenized": copy_without(checkpoint, tmp_path / "untokenized", "tokenizer.json")}
    check = ("import sys\nfrom pipeline.checkpoint import check_model\n"
             "try:\n    check_model(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)")
    said = {}
    for repo in StandInHub.repos:
        done = subprocess.run([sys.executable, "-c", check, repo], cwd=REPO, env=hub_env(hub, tmp_path),
                              capture_output=True, text=True, timeout=120)
        said[repo] = done.stdout.strip()
    assert said["owner/whole"] == ""
    assert said["owner/pickled"].startswith("CheckpointError model 'owner/pickled' has no safetensors weights")
    assert said["owner/untokenized"] == ("FileNotFoundError model 'owner/untokenized' has no tokenizer.json: "
                                         "not a checkpoint folder in the Hugging Face layout")


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json"])
def test_a_folder_without_a_file_the_actors_read_is_named(checkpoint, tmp_path, missing):
    folder = copy_without(checkpoint, tmp_path, missing)
    with pytest.raises(FileNotFoundError, match=f"has no {missing}: not a checkpoint folder"):
        check_model(str(folder))


def test_pickle_weights_only_are_refused(checkpoint, tmp_path):
    folder = copy_without(checkpoint, tmp_path, "*.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        check_model(str(folder))


@pytest.mark.parametrize("keep", [0.5, 4 / (1 << 20), 1 - 1 / (1 << 20)])
def test_weights_cut_short_are_refused(checkpoint, tmp_path, keep):
    """A download or copy cut short: each replica's load would fail in turn, minutes in."""
    folder = copy_without(checkpoint, tmp_path)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(max(int(weights.stat().st_size * keep), 1))
    with pytest.raises(CheckpointError, match="model.safetensors is not a complete safetensors file"):
        check_model(str(folder))


def test_weights_that_are_not_safetensors_are_refused(checkpoint, tmp_path):
    folder = copy_without(checkpoint, tmp_path)
    header = b"{not json"
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        check_model(str(folder))


def test_a_header_longer_than_safetensors_allows_is_refused_unread(checkpoint, tmp_path):
    """The header is read whole before it is parsed: a file saying its header is 200 MB long (a
    sparse file here) must not make the driver read that much."""
    folder = copy_without(checkpoint, tmp_path)
    with (folder / "model.safetensors").open("wb") as f:
        f.write((200_000_000).to_bytes(8, "little"))
        f.truncate(200_000_100)
    with pytest.raises(CheckpointError, match="its header says it is 200000000 bytes long"):
        check_model(str(folder))


REFUSE_SYSTEM = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"


@pytest.mark.parametrize("template,system,says", [
    ("{% for m in messages %}{{ m.content ", None, "ChatTemplateError: chat template failed: unexpected end of template"),
    (REFUSE_SYSTEM + "{original}", "Be brief.", "System role not supported"),
])
def test_a_chat_template_that_cannot_make_a_rows_prompt_is_refused(checkpoint, tmp_path, template, system, says):
    """Else every CPU-stage actor, and the job, would fail on it once a cluster is up."""
    from pipeline import PipelineConfig
    from pipeline.checks import check_row_encoding

    folder = copy_without(checkpoint, tmp_path)
    original = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(template.replace("{original}", original))
    with pytest.raises(ValueError, match=f"its processor files cannot make a row's prompt .*{says}"):
        check_row_encoding(PipelineConfig(model=str(folder), system_prompt=system))
    if system:
        check_row_encoding(PipelineConfig(model=str(folder)))          # without the system turn it renders


@pytest.mark.parametrize("setting,says", [(dict(prompt="Describe <image> it."), "prompt 'Describe <image> it.'"),
                                          (dict(prompt_suffix=" <image>"), "prompt_suffix ' <image>'"),
                                          (dict(system_prompt="See <image>"), "system_prompt 'See <image>'")])
def test_a_prompt_or_suffix_no_row_can_take_is_refused(checkpoint, setting, says):
    """An image marker in --prompt or --prompt-suffix made every row (without a question) an error
    row, where one in --system-prompt was refused before any work: both are now (the system prompt's
    named as such: it read as the model's processor files failing)."""
    from pipeline import PipelineConfig
    from pipeline.checks import check_row_encoding

    with pytest.raises(ValueError, match=f"{says} cannot make a row's prompt .*image marker"):
        check_row_encoding(PipelineConfig(model=str(checkpoint), **setting))


def test_a_tokenizer_cut_short_is_refused_before_any_work(checkpoint, tmp_path):
    from pipeline import PipelineConfig
    from pipeline.job import prepare_job
    from tests.pipeline.helpers import good_rows, write_parquet

    folder = copy_without(checkpoint, tmp_path)
    text = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(text[:len(text) // 2])
    source = write_parquet(tmp_path / "in.parquet", good_rows(1))
    with pytest.raises(ValueError, match="its processor files cannot make a row's prompt"):
        prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(folder)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["/no/such/checkpoint", "./ckpt", "~/models/x", "a/b/c"])
def test_a_path_that_is_no_folder_nor_a_hub_id(path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        check_model(path)


def test_a_weights_file_named_instead_of_its_folder(checkpoint):
    with pytest.raises(FileNotFoundError, match="a file, not a checkpoint folder"):
        check_model(str(checkpoint / "model.safetensors"))


def test_a_config_the_replicas_cannot_build_or_split(checkpoint, tmp_path):
    import json

    from tests.fixtures.checkpoints import build_checkpoint

    check_model(str(build_checkpoint(tmp_path / "idefics3", "idefics3")), tensor_parallel_size=2)
    config = json.loads((checkpoint / "config.json").read_text())
    heads = config["text_config"]["num_attention_heads"]
    with pytest.raises(CheckpointError, match=f"cannot shard this model: text_config.num_attention_heads "
                                              f"\\({heads}\\) is not divisible by tensor_parallel_size 2"):
        check_model(str(checkpoint), tensor_parallel_size=2)
    folder = copy_without(checkpoint, tmp_path)
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        check_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="Expecting property name"):
        check_model(str(folder))
