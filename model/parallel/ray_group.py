"""One Ray actor per rank: the tensor-parallel group as the pipeline runs it.

Ray is imported only when a group is built (model/ must import without Ray). The caller places the
replica: pass a placement group (one bundle per rank, STRICT_PACK), or create the group from inside an
actor whose placement group captures child tasks. Same `generate(requests) -> results` as TPEngine,
and `answer(batch)` to stream batches through one engine (the pipeline's model stage).
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

import torch

from ..config import Idefics3Config, check_tp
from ..engine import Request, Result
from ..files import resolve_checkpoint_dir
from .worker import TPWorker


class TPGroupBroken(RuntimeError):
    """A rank of the group has died: the group cannot answer any more (build a new one)."""


# A request refused before any rank works on it (check_request's ValueError): no sign of a follower's
# death, which rank 0 sees as a RuntimeError of a collective (torch.distributed's errors all are).
ROW_ERRORS = (ValueError,)
# How long a collective's error waits for Ray to report a follower dead: Ray may take a second or
# more to notice, longer on a loaded node, and a death taken for a row's error would fail the batch.
DEATH_NEWS_S = 10.0


class RayTPGroup:
    def __init__(self, model_path: str | Path, tp: int, dtype: torch.dtype | str | None = None,
                 device_type: str = "cpu", tokenizer=None, *, placement_group=None, num_cpus: float = 1,
                 cpu_threads: int | None = None, timeout_s: float = 600.0, batches_in_flight: int = 1,
                 step_timeout_s: float | None = None, fetch: Callable[[str], str] | None = None,
                 adapter: str | None = None, **engine_kwargs) -> None:
        """`fetch`: model_path (and `adapter`, a LoRA adapter merged as the shards load) -> a local
        folder on the calling node (each rank calls it on its own node: a checkpoint named by URL,
        copied where it is read); None: model_path is a folder."""
        import ray
        from ray.util import get_current_placement_group

        folder = resolve_checkpoint_dir(fetch(str(model_path)) if fetch else model_path)
        check_tp(Idefics3Config.from_pretrained(folder), tp)       # before any actor starts
        engine_kwargs.setdefault("use_cuda_graphs", tp == 1)
        actor = ray.remote(TPWorker)
        # Inside an actor whose placement group captures child tasks, rank r takes bundle r of it.
        placement_group = placement_group or get_current_placement_group()
        self.workers = [
            actor.options(**self._placement(rank, placement_group, device_type, num_cpus),
                          max_concurrency=batches_in_flight + 2 if rank == 0 else 1).remote(
                rank, tp, str(model_path) if fetch else str(folder), fetch=fetch, dtype=dtype, device_type=device_type,
                tokenizer=tokenizer, cpu_threads=cpu_threads, engine_kwargs=engine_kwargs, adapter=adapter,
                step_timeout_s=step_timeout_s if rank == 0 else None)
            for rank in range(tp)]
        self.follow_refs: list = []
        self.broken: str | None = None
        try:
            self._start(ray, timeout_s)
        except BaseException:
            self._kill(ray)
            raise

    @staticmethod
    def _placement(rank: int, placement_group, device_type: str, num_cpus: float) -> dict:
        options = {"num_cpus": num_cpus, "num_gpus": 1 if device_type == "cuda" else 0}
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=rank)
        return options

    def _start(self, ray, timeout_s: float) -> None:
        """Raises TPGroupBroken where a rank dies while the group starts: the caller may build another
        (as it does for a rank lost later); a load that fails on a rank is that rank's error. Ranks
        that no node can hold within `timeout_s` (a group rebuilt after its node's loss, where no node
        left has room) are a RuntimeError: they waited for ever."""
        try:
            hosts = self._hosts(ray, timeout_s)
            if len(set(hosts)) != 1:
                raise RuntimeError(f"the ranks of one tensor-parallel replica landed on several nodes "
                                   f"{sorted(set(hosts))}: place them with a STRICT_PACK placement group")
            addr, port = ray.get(self.workers[0].rendezvous_address.remote())
            ray.get([w.setup.remote(addr, port, timeout_s) for w in self.workers])
        except Exception as e:      # the survivors' collectives fail too: which error comes first varies
            dead = self._dead_ranks(ray)
            if not dead:
                raise
            self.broken = f"rank {dead[0]} died while the group started: {type(e).__name__}: {e}"
            raise TPGroupBroken(self.broken) from e
        self.follow_refs = [w.follow.remote() for w in self.workers[1:]]

    def _hosts(self, ray, timeout_s: float) -> list[str]:
        try:
            return ray.get([w.hostname.remote() for w in self.workers], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the {len(self.workers)} ranks of a tensor-parallel replica did not start within "
                               f"{timeout_s:.0f}s: no node could hold them (cluster resources: "
                               f"{ray.cluster_resources()})") from None

    def _dead_ranks(self, ray, wait_s: float = 10.0) -> list[int]:
        """The ranks whose actor has died (one still busy is taken as alive)."""
        dead = []
        for rank, worker in enumerate(self.workers):
            try:
                ray.get(worker.hostname.remote(), timeout=wait_s)
            except ray.exceptions.RayActorError:
                dead.append(rank)
            except ray.exceptions.GetTimeoutError:
                pass
        return dead

    def generate(self, requests: list[Request]) -> list[Result]:
        """Rank 0's answers. Raises TPGroupBroken when a rank has died (before or during the call);
        other errors (a request the engine refuses) pass through, the group still usable."""
        import ray
        self._check_alive(ray, wait_s=0.0)
        try:
            return ray.get(self.workers[0].generate.remote(requests))
        except ray.exceptions.RayActorError as e:
            raise self._rank0_died(e) from e
        except Exception as e:
            if not isinstance(e, ROW_ERRORS):    # a follower's death surfaces at rank 0 as a collective error
                self._check_alive(ray, wait_s=DEATH_NEWS_S)
            raise

    async def answer(self, requests: dict) -> dict:
        """One batch's outcomes (key -> Result, or that request's exception); batches awaited side
        by side share decode steps (rank 0 streams them: TPWorker.serve, `batches_in_flight` at
        once). Raises TPGroupBroken when a rank has died."""
        import ray
        self._check_alive(ray, wait_s=0.0)
        try:
            outcomes = await self.workers[0].serve.remote(requests)
        except ray.exceptions.RayActorError as e:
            raise self._rank0_died(e) from e
        if any(isinstance(o, Exception) and not isinstance(o, ROW_ERRORS) for o in outcomes.values()):
            await asyncio.to_thread(self._check_alive, ray, DEATH_NEWS_S)    # was it a follower's death?
        return outcomes

    def _rank0_died(self, error: Exception) -> TPGroupBroken:
        self.broken = f"rank 0 died: {error}"
        return TPGroupBroken(self.broken)

    def _check_alive(self, ray, wait_s: float) -> None:
        refs = self.follow_refs     # once: a batch beside this one (another thread) may close the group meanwhile
        if not self.broken and refs:
            done, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            if done:   # followers return only when stopped: an early return is a death
                rank = 1 + refs.index(done[0])
                try:
                    ray.get(done[0])
                    self.broken = f"rank {rank} left the group"
                except Exception as e:
                    self.broken = f"rank {rank} died: {type(e).__name__}: {e}"
        if self.broken:
            raise TPGroupBroken(self.broken)

    def shard_stats(self) -> list[dict]:
        import ray
        return ray.get(self.workers[0].shard_stats.remote())

    def close(self) -> None:
        import ray
        if not self.workers:
            return
        if self.broken:       # no polite shutdown: the survivors would wait on the dead rank
            self._kill(ray)
            return
        ray.get(self.workers[0].shutdown.remote())
        ray.get(self.follow_refs)           # the followers return once they have left the group
        self._kill(ray)

    def _kill(self, ray) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers, self.follow_refs = [], []
