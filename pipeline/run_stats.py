"""Counts the model replicas report to the driver during a run, which the output files cannot tell:
how many rows took another row's answer (pipeline.dedup) and the tokens those answers hold, so the
summary's generated tokens/s counts only what the model generated; and how each replica ran (its
device and dtype), with its first batch.

One small named actor per run holds them; a replica awaits its report before its batch leaves, so
the driver reads every written batch's counts once the write is done. A batch retried after its
replica died may be counted twice: the counts are the run's work, not a reconciliation.
"""
from __future__ import annotations

import logging
import uuid
from collections import Counter

import ray

log = logging.getLogger(__name__)

NAME_PREFIX = "idefics3-run-stats-"
REPLICA_KIND = "replica: "      # a count's key: one replica that ran so (pipeline.replica.replica_kind),
REPLICA_OF = " of actor "       # ... and which: a replica restarted (its actor's id kept) reports again


def replica_key(kind: str) -> str:
    """A replica's count key: its kind and, inside an actor, the actor's id (ray.get_runtime_context()
    would start a Ray cluster where none is: a stage made outside Ray, as the library's users may)."""
    actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    return f"{REPLICA_KIND}{kind}{REPLICA_OF}{actor or ''}"


def replica_kinds(counts: dict[str, int]) -> dict[str, int]:
    """How many replicas ran each kind: their keys, not the reports (a restarted replica's count twice)."""
    kinds = (k.removeprefix(REPLICA_KIND).split(REPLICA_OF)[0] for k in counts if k.startswith(REPLICA_KIND))
    return dict(Counter(kinds))


@ray.remote(num_cpus=0)
class RunStats:
    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def read(self) -> dict[str, int]:
        return dict(self.counts)


class RunCounter:
    """The driver's side: starts the run's counter (its `name` goes to the replicas) and `close()`
    reads it. The handle is kept: a named actor still dies when its creator's last handle goes. It
    lives on the driver's node: on another, that node's loss mid-run lost the run's counts."""

    def __init__(self) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.name = NAME_PREFIX + uuid.uuid4().hex[:12]
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.handle = RunStats.options(name=self.name, scheduling_strategy=here).remote()

    def close(self) -> dict[str, int]:
        """The counts reported, and the counter gone; none where it died (the run's own error, if
        any, is the one to see)."""
        try:
            counts = ray.get(self.handle.read.remote(), timeout=60)
            ray.kill(self.handle)
            return counts
        except Exception as e:
            log.warning("the run's counts of shared answers are lost: %s", e)
            return {}


class StatsReporter:
    """A replica's side: `await report(counts)` adds them to the run's counter (nothing without one,
    as when a stage runs outside a job; a counter that died loses the counts, never a batch)."""

    def __init__(self, name: str | None) -> None:
        self.name, self._handle, self.lost = name, None, False

    async def report(self, counts: dict[str, int]) -> None:
        counts = {k: v for k, v in counts.items() if v}
        if self.name is None or not counts:
            return
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self.name)
            await self._handle.add.remote(counts)
        except Exception as e:      # counts are not worth a batch: its rows are answered
            if not self.lost:
                log.warning("the run's counter is gone (%s): this replica's counts of shared answers are lost", e)
            self.lost = True
