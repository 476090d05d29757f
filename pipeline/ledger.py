"""The rows an actor is working on, on local disk, so that the process Ray starts after a crash
knows what was running.

Ray Data restarts a dead actor (same actor id) and retries the batches it held, for ever: a row
that kills its process every time (a decoder that segfaults on it, a host OOM kill) would loop the
job. Each stage's actor writes the ids it works on to a small file named after the job, the stage
and its actor id, and its successor reads it back. A row that was in flight at a death is a
suspect: it runs alone (nothing else in flight in the process), so the next death is its own. A
row whose process died each of SOLO_DEATHS times it ran alone becomes an error row.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

from .storage import private_temp_folder

SOLO_DEATHS = 2
LOAD_DEATHS = 3
LOAD_DEATHS_ENV = "PIPELINE_LOAD_DEATHS"     # another count (the tests': 1)
ROOT_ENV = "PIPELINE_LEDGER_DIR"      # where the files go (default: <the node's temp dir>/idefics3-ray-ledgers-<uid>)
STALE_S = 7 * 24 * 3600               # a file untouched this long is an ended job's (a live actor rewrites its own)


def ledger_root() -> Path:
    return Path(os.environ[ROOT_ENV]) if os.environ.get(ROOT_ENV) else private_temp_folder("idefics3-ray-ledgers")


def ledger_path(stage: str) -> Path | None:
    """This actor's file, or None outside a Ray actor (nothing restarts the process there)."""
    import ray

    if not ray.is_initialized():           # get_runtime_context() would start a local Ray
        return None
    context = ray.get_runtime_context()
    actor = context.get_actor_id()
    if actor is None:
        return None
    remove_stale_ledgers()
    return ledger_root() / f"{context.get_job_id()}-{stage}-{actor}.json"


def remove_stale_ledgers(max_age_s: float = STALE_S) -> int:
    """Files of ended jobs on this node: the driver removes its own node's, not the other nodes',
    so each actor clears the stale ones where it starts. Returns how many."""
    now, removed = time.time(), 0
    for path in ledger_root().glob("*.json"):
        with contextlib.suppress(FileNotFoundError):       # another actor of this node got it first
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed += 1
    return removed


def remove_job_ledgers() -> int:
    """Driver side, after a run: this job's ledger files on this node (a resumed run is a new job
    and starts its own). Files on other nodes go when they are stale (remove_stale_ledgers). Returns
    how many were removed."""
    import ray

    if not ray.is_initialized():
        return 0
    files = list(ledger_root().glob(f"{ray.get_runtime_context().get_job_id()}-*.json"))
    for path in files:
        path.unlink(missing_ok=True)
    return len(files)


class CrashLedger:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.deaths: Counter = Counter()          # row id -> deaths of the process while it was in flight
        self.solo_deaths: Counter = Counter()     # ... while it was the only row in flight
        self.in_flight: set[str] = set()
        self.alone = False
        self._lock = threading.Lock()
        self._recover()

    def _recover(self) -> None:
        if self.path is None or not self.path.exists():
            return
        state = json.loads(self.path.read_text())
        self.deaths.update(state["deaths"])
        self.solo_deaths.update(state["solo_deaths"])
        for row in state["in_flight"]:            # our predecessor died with these in flight
            self.deaths[row] += 1
            self.solo_deaths[row] += state["alone"]
        self._save()

    def suspect(self, row: str) -> bool:
        return self.deaths[row] > 0

    def condemned(self, row: str) -> bool:
        return self.solo_deaths[row] >= SOLO_DEATHS

    def verdict(self, row: str) -> str:
        return (f"the process died whenever it worked on this row alone ({self.solo_deaths[row]} times; "
                f"{self.deaths[row]} deaths with it in flight); not tried again")

    @contextlib.contextmanager
    def working(self, rows: list[str], alone: bool = False):
        """`rows` are in flight (the only ones, if `alone`) for the duration."""
        with self._lock:
            self.in_flight.update(rows)
            self.alone = alone
            self._save()
        try:
            yield
        finally:
            with self._lock:
                self.in_flight.difference_update(rows)
                self.alone = False
                self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"in_flight": sorted(self.in_flight), "alone": self.alone,
                 "deaths": dict(self.deaths), "solo_deaths": dict(self.solo_deaths)}
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(state))
        os.replace(partial, self.path)            # a death mid-write leaves the previous state


@contextlib.contextmanager
def loading_watched(path: Path | None, what: str = "the model"):
    """A start of this actor's process that dies while it loads `what` (a host OOM kill of a model too big
    for the node) is counted: Ray restarted it for ever, the job saying nothing. After LOAD_DEATHS (or
    $PIPELINE_LOAD_DEATHS), the next start refuses (a RuntimeError of its creation task ends the run, naming it)."""
    if path is None:
        yield
        return
    deaths = json.loads(path.read_text())["load_deaths"] if path.exists() else 0
    if deaths >= int(os.environ.get(LOAD_DEATHS_ENV, LOAD_DEATHS)):
        raise RuntimeError(f"this actor's process died each time it loaded {what} ({deaths} times; killed: the "
                           "node's memory too small for it? Ray's OOM killer says so in the raylet's log); "
                           "not tried again")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"load_deaths": deaths + 1}))
    os.replace(partial, path)       # a death mid-write leaves the previous count
    try:
        yield
    finally:        # loaded, or failed with an exception: only a death leaves the count
        path.unlink(missing_ok=True)


class Gate:
    """An async actor's batches share its engine; a suspect row waits until nothing else is in
    flight, and nothing starts while it runs, so that a death while it runs is its own."""

    def __init__(self) -> None:
        self._condition: asyncio.Condition | None = None     # made in the actor's event loop
        self._shared = self._waiting_alone = 0
        self._alone = False

    def _cond(self) -> asyncio.Condition:
        if self._condition is None:
            self._condition = asyncio.Condition()
        return self._condition

    @contextlib.asynccontextmanager
    async def shared(self):
        cond = self._cond()
        async with cond:
            await cond.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._shared += 1
        try:
            yield
        finally:
            async with cond:
                self._shared -= 1
                cond.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self):
        cond = self._cond()
        async with cond:
            self._waiting_alone += 1
            try:
                await cond.wait_for(lambda: not self._alone and not self._shared)
            finally:        # also when cancelled as it waits: else every later shared() would wait for ever
                self._waiting_alone -= 1
                cond.notify_all()
            self._alone = True
        try:
            yield
        finally:
            async with cond:
                self._alone = False
                cond.notify_all()
