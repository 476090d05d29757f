"""TPEngine: a tensor-parallel engine over local processes. This process is rank 0 and drives;
ranks 1.. are spawned processes that follow its commands (TPWorker)."""
from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor

from ..config import Idefics3Config, check_tp
from ..engine import Request, Result
from ..files import resolve_checkpoint_dir
from .engine import ShardEngine
from .worker import TPWorker, free_port


def _follower_main(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float,
                   spec: dict, joining) -> None:
    worker = TPWorker(rank, world_size, **spec)
    joining.send(rank)
    try:
        worker.setup(master_addr, master_port, timeout_s)
    except RuntimeError:
        return                  # rank 0 reports the failure
    worker.follow()


class TPEngine:
    """`generate(list[Request]) -> list[Result]` like model.engine.LLMEngine, on `tp` devices.

    This process is rank 0 (it loads its shard here and drives); ranks 1..tp-1 are spawned processes.
    On CUDA, rank r uses cuda:r of the visible devices. A config that cannot be split raises before
    any process starts. Close it (or use `with`) to stop the followers.
    """

    def __init__(self, model_path: str | Path, tp: int = 1, dtype: torch.dtype | str | None = None,
                 device_type: str = "cpu", tokenizer=None, *, cpu_threads: int | None = None,
                 timeout_s: float = 600.0, adapter: str | None = None, **engine_kwargs) -> None:
        folder = resolve_checkpoint_dir(model_path)
        check_tp(Idefics3Config.from_pretrained(folder), tp)
        if device_type == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"tensor_parallel_size {tp} needs {tp} visible GPUs, found {torch.cuda.device_count()}")
        engine_kwargs.setdefault("use_cuda_graphs", tp == 1)   # graphs around NCCL collectives: not yet validated
        # Every rank gets the tokenizer: the ranks end a sequence on a stop string each on its own.
        spec = dict(model_path=str(folder), dtype=dtype, device_type=device_type, cpu_threads=cpu_threads,
                    engine_kwargs=engine_kwargs, tokenizer=tokenizer, adapter=adapter and str(adapter))
        port = free_port()
        context = mp.get_context("spawn")
        pipes = [context.Pipe(duplex=False) for _ in range(1, tp)]
        self.processes = [context.Process(target=_follower_main, daemon=True,
                                          args=(rank, tp, "127.0.0.1", port, timeout_s, spec, sender))
                          for rank, (_, sender) in zip(range(1, tp), pipes)]
        for p in self.processes:
            p.start()
        try:
            self._await_followers([reader for reader, _ in pipes], timeout_s)
            self.worker = TPWorker(0, tp, **spec)
            self.worker.setup("127.0.0.1", port, timeout_s)
        except BaseException:
            self._reap(timeout=5.0)
            raise

    def _await_followers(self, joining: list, timeout_s: float) -> None:
        """Each spawned rank says when it is about to join the group: one that exits before (an
        import error, a script without a __main__ guard, an OOM kill) is named now, not after the
        rendezvous waited out its timeout for it."""
        deadline, waiting = time.monotonic() + timeout_s, dict(enumerate(joining, start=1))
        while waiting:
            for rank, reader in list(waiting.items()):
                if reader.poll():
                    del waiting[rank]
                elif self.processes[rank - 1].exitcode is not None:
                    raise RuntimeError(f"tensor-parallel rank {rank} exited (code {self.processes[rank - 1].exitcode}) "
                                       "before joining the group")
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks {sorted(waiting)} did not start within {timeout_s:g} s")
            time.sleep(0.02 if waiting else 0)

    @property
    def engine(self) -> ShardEngine:
        return self.worker.engine

    def generate(self, requests: list[Request]) -> list[Result]:
        return self.worker.generate(requests)

    def submit(self, requests: dict) -> Future:
        """Batches submitted from any thread share decode steps (EngineLoop); {key: Result | exception}."""
        return self.worker.submit(requests)

    def logits(self, **inputs) -> Tensor:
        return self.worker.logits(**inputs)

    def shard_stats(self) -> list[dict]:
        return self.worker.shard_stats()

    def close(self) -> None:
        """Stop the followers; where a rank had died or hung, the others are stopped without it."""
        parted = self.worker.shutdown()
        self._reap(timeout=30.0 if parted else 1.0)

    def _reap(self, timeout: float) -> None:
        for p in self.processes:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(5.0)
        self.processes = []

    def __enter__(self) -> "TPEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def launch_local(tp: int, model_path: str | Path, **kwargs) -> TPEngine:
    """A TPEngine over `tp` local processes (this one is rank 0); kwargs as TPEngine's."""
    return TPEngine(model_path, tp, **kwargs)
