"""The process model: one TPWorker per rank. Rank 0 drives; ranks 1.. follow its commands.

Rank 0 broadcasts each command (generate, logits, stats, stop) with its inputs once; every rank then
runs the same steps on its shard. TPWorker is plain Python: run it in processes (`TPEngine` in local.py, or
`python -m model.parallel.worker` under torchrun) or wrap it with `ray.remote` (model/parallel/ray_group.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import random
import socket
import threading
import traceback
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine import Request, Result, SamplingParams
from ..engine.loop import EngineLoop
from ..loading import DEVICE_DTYPE, common_dtype, compute_dtype
from .engine import Comm, ShardEngine
from .faults import SETUP, fail_once_at, fail_once_on
from .layers import TPContext
from .loading import load_shard
from .shard import sharded_fraction

log = logging.getLogger(__name__)
STOP = "stop"


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rank_device(device_type: str, rank: int) -> torch.device:
    """cuda:rank when this process sees every GPU of the group (multiprocessing), cuda:0 when it sees
    only its own (a Ray actor with one GPU)."""
    if device_type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(device_type)


def _to_cpu(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().cpu()


def _shipped(request: Request) -> Request:
    """The request as the other ranks receive it (tensors on the CPU)."""
    return dataclasses.replace(request, pixel_values=_to_cpu(request.pixel_values),
                               pixel_attention_mask=_to_cpu(request.pixel_attention_mask))


class TPWorker:
    def __init__(self, rank: int, world_size: int, model_path: str | Path, dtype: torch.dtype | str | None = None,
                 device_type: str = "cpu", tokenizer=None, cpu_threads: int | None = None,
                 engine_kwargs: dict | None = None, step_timeout_s: float | None = None,
                 fetch: Callable[[str], str] | None = None, adapter: str | None = None) -> None:
        self.rank, self.world_size, self.model_path = rank, world_size, str(model_path)
        self.fetch = fetch                        # model_path (and adapter) -> a local folder (RayTPGroup)
        self.adapter = adapter                    # a LoRA adapter folder, merged into the shard (model.lora)
        self.step_timeout_s = step_timeout_s      # rank 0's EngineLoop ends this process past it
        self.dtype, self.device_type, self.tokenizer = dtype, device_type, tokenizer
        self.engine_kwargs = dict(engine_kwargs or {})
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.comm: Comm | None = None
        self.engine: ShardEngine | None = None
        self._rng = random.Random()
        self.last_tokens: list[list[int]] = []
        # Rank 0 may be called from several threads (a threaded Ray actor: streamed batches, stats):
        # a command's broadcast and its local run must not interleave with another's.
        self._lock = threading.RLock()
        self.loop: EngineLoop | None = None
        self._shut = False                        # shutdown() began: submit() starts no new loop

    # ---- start and stop -----------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """(address, free port) of this worker's host; ask rank 0's worker, give it to every rank.
        127.0.0.1: a replica's ranks share one node (STRICT_PACK); torchrun passes its own address."""
        return "127.0.0.1", free_port()

    def hostname(self) -> str:
        return socket.gethostname()

    def setup(self, master_addr: str | None, master_port: int | None, timeout_s: float = 600.0) -> dict:
        """Join the group, load this rank's shard and build its engine. Collective: call on every rank.
        master_addr None: rendezvous through the environment (torchrun's store). Raises on every rank
        if any rank failed to load."""
        tp = self._join(master_addr, master_port, timeout_s)
        fail_once_at(self.rank, {SETUP})
        dtype, error = self._group_dtype(), None
        try:
            device = rank_device(self.device_type, self.rank)
            local = self.fetch or (lambda path: path)
            model = load_shard(local(self.model_path), tp, dtype=dtype, device=device,
                               adapter=self.adapter and local(self.adapter))
            self.engine = ShardEngine(model, self.comm, tokenizer=self.tokenizer, **self.engine_kwargs)
        except Exception as e:  # reported to every rank below, so no rank waits forever for another
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
            log.error("loading failed on rank %d\n%s", self.rank, traceback.format_exc())
        errors = [e for e in self.comm.all_gather_object(error) if e]
        if errors:
            self._leave()
            raise RuntimeError("tensor-parallel load failed: " + "; ".join(errors))
        return self._stats()

    def _group_dtype(self) -> torch.dtype | str | None:
        """DEVICE_DTYPE: each rank asks its own GPU (the actor driving the group may hold none) and
        the ranks agree on one. Collective: every rank calls it before anything that may fail on
        one rank alone, so the ranks' later collectives still pair up."""
        if self.dtype != DEVICE_DTYPE:
            return self.dtype
        try:
            mine = compute_dtype(rank_device(self.device_type, self.rank))
        except Exception:       # this rank's load below fails too, and says why
            mine = None
        choices = [c for c in self.comm.all_gather_object(mine) if c is not None]
        return common_dtype(choices) if choices else None

    def _join(self, master_addr: str | None, master_port: int | None, timeout_s: float) -> TPContext:
        if self.world_size == 1:
            self.comm = Comm(TPContext())
            return self.comm.tp
        if self.device_type == "cuda":
            torch.cuda.set_device(rank_device("cuda", self.rank))
        backend = "nccl" if self.device_type == "cuda" else "gloo"
        init = "env://" if master_addr is None else f"tcp://{master_addr}:{master_port}"
        dist.init_process_group(backend, init_method=init, rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        self.comm = Comm(TPContext(self.rank, self.world_size, dist.group.WORLD), cpu_group)
        return self.comm.tp

    def _leave(self, together: bool = False) -> None:
        try:
            if dist.is_initialized():
                if together:  # every rank past the STOP broadcast before any tears its sockets down
                    dist.barrier()
                dist.destroy_process_group()
        finally:
            # Drop every reference to the group (the engine's layers hold it) and collect now: a group
            # object left to interpreter teardown joins its threads too late and aborts the process.
            self.engine, self.comm = None, None
            gc.collect()

    def shutdown(self) -> bool:
        """Rank 0: answer what was streamed, release the followers and leave the group. Idempotent.
        False where a rank had died or hung: the group was left without it (the error that broke it
        was raised by the call that met it)."""
        with self._lock:
            self._shut, loop, self.loop = True, self.loop, None
        if loop is not None:
            loop.close()            # not under the lock: its thread's commands take it
        with self._lock:
            releasing = self.engine is not None and self.rank == 0
            try:
                if releasing:
                    self.comm.broadcast_object((STOP, None))
                self._leave(together=releasing)
                return True
            except Exception as e:  # noqa: BLE001 - the survivors cannot part politely with a dead rank
                log.warning("tensor-parallel rank %d left a broken group: %s", self.rank, e)
                with contextlib.suppress(Exception):
                    self._leave()
                return False

    # ---- rank 0 -------------------------------------------------------------------------------
    def _command(self, name: str, payload, local=None):
        """Broadcast (name, payload), then run it here too (with `local` in place of the payload)."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 drives the tensor-parallel group; the others run follow()")
        if self.engine is None:
            raise RuntimeError("the worker is not set up (or already shut down)")
        with self._lock:
            self.comm.broadcast_object((name, payload))
            return getattr(self, "_on_" + name)(payload if local is None else local)

    def generate(self, requests: list[Request]) -> list[Result]:
        """Like LLMEngine.generate. Seeds and stop ids are fixed here so every rank samples alike."""
        for r in requests:
            self.engine.check_request(r)   # refuse bad input before any rank starts working on it
        pinned = [self._pin(r) for r in requests]
        return self._command("generate", [_shipped(r) for r in pinned], local=pinned)

    def submit(self, requests: dict) -> Future:
        """Future of one batch's outcomes (key -> Result, or the exception of that request alone), as
        EngineLoop.submit: its requests join the decode steps of the batches submitted before."""
        with self._lock:
            if self._shut:
                raise RuntimeError("submit() on a tensor-parallel worker that is shut down")
            if self.loop is None:
                self.loop = EngineLoop(self, stall_timeout_s=self.step_timeout_s)
            loop = self.loop
        return loop.submit(requests)

    def serve(self, requests: dict) -> dict:
        """submit(requests)'s outcomes, for a threaded Ray actor (its calls wait side by side)."""
        return self.submit(requests).result()

    # The streaming API of LLMEngine, for EngineLoop: every rank adds and steps alike.
    def check_request(self, request: Request) -> None:
        self.engine.check_request(request)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def device_ok(self) -> bool:
        """Rank 0's device (a poisoned rank elsewhere fails the group's collectives: TPGroupBroken)."""
        return self.engine.device_ok()

    def add_requests(self, requests: list[Request]) -> None:
        pinned = [self._pin(r) for r in requests]
        self._command("add", [_shipped(r) for r in pinned], local=pinned)

    def step(self) -> list[Result]:
        return self._command("step", None)

    def abort(self) -> None:
        self._command("abort", None)

    def _pin(self, request: Request) -> Request:
        s = request.sampling
        seed = s.seed if s.seed is not None else self._rng.getrandbits(62)
        stop = tuple(s.stop_token_ids if s.stop_token_ids is not None else self.engine.stop_ids)
        return dataclasses.replace(request, sampling=dataclasses.replace(s, seed=seed, stop_token_ids=stop))

    def logits(self, **inputs) -> Tensor:
        """Full-vocabulary logits of one forward pass (Idefics3ForConditionalGeneration's arguments), on CPU."""
        return self._command("logits", {k: _to_cpu(v) if isinstance(v, Tensor) else v for k, v in inputs.items()})

    def shard_stats(self) -> list[dict]:
        """Per rank: parameter elements held and how many of them are sharded, its dtype, the last answers,
        decode steps run, prompt tokens whose K/V were copied, and whether the decode step runs compiled (False if off, or if compiling it failed)."""
        return self._command("stats", None)

    # ---- every rank ---------------------------------------------------------------------------
    def follow(self) -> None:
        """Ranks 1..: run rank 0's commands until it stops the group."""
        while True:
            name, payload = self.comm.broadcast_object()
            if name == STOP:
                break
            try:
                getattr(self, "_on_" + name)(payload)
            except Exception:  # rank 0 raises the same error to its caller; keep following
                log.error("rank %d: %s failed\n%s", self.rank, name, traceback.format_exc())
        self._leave(together=True)

    def _on_generate(self, requests: list[Request]) -> list[Result]:
        fail_once_on(self.rank, requests)
        results = self.engine.generate(requests)
        self.last_tokens = [r.token_ids for r in results]   # reported by stats: ranks must agree
        return results

    def _on_add(self, requests: list[Request]) -> None:
        fail_once_on(self.rank, requests)
        self.engine.add_requests(requests)

    def _on_step(self, _) -> list[Result]:
        results = self.engine.step()
        if results:
            self.last_tokens = [r.token_ids for r in results]
        return results

    def _on_abort(self, _) -> None:
        self.engine.abort()

    @torch.inference_mode()
    def _on_logits(self, inputs: dict) -> Tensor:
        device = self.engine.device
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        return self.engine.model(**inputs).logits.float().cpu()

    def _on_stats(self, _) -> list[dict]:
        return self.comm.all_gather_object(self._stats())

    def _stats(self) -> dict:
        sharded, total = sharded_fraction(self.engine.model)
        return {"rank": self.rank, "sharded_params": sharded, "total_params": total,
                "kv_heads": self.engine.model.config.text_config.num_key_value_heads,
                "dtype": str(next(self.engine.model.parameters()).dtype).replace("torch.", ""),
                "last_tokens": self.last_tokens, "decode_steps": self.engine.stats["decode_steps"],
                "prefix_tokens_reused": self.engine.stats["prefix_tokens_reused"],
                "compiled_decode": self.engine.runner is not None and self.engine.runner.compile}


def main(argv: list[str] | None = None) -> None:
    """torchrun --nproc-per-node N -m model.parallel.worker --model PATH --prompt-ids 1,2,3"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids of one text prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cpu-threads", type=int, default=None)
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    worker = TPWorker(rank, world, args.model, dtype=args.dtype, device_type=args.device,
                      cpu_threads=args.cpu_threads)
    worker.setup(None, None)   # torchrun's rendezvous (a single process needs none)
    if rank != 0:
        worker.follow()
        return
    ids = [int(t) for t in args.prompt_ids.split(",")]
    result = worker.generate([Request("0", ids, sampling=SamplingParams(max_new_tokens=args.max_new_tokens))])[0]
    print(" ".join(map(str, result.token_ids)), result.finish_reason, flush=True)
    worker.shutdown()


if __name__ == "__main__":
    main()
