"""Fault injection for the tests of tensor-parallel recovery: a rank's process dies, or stops
answering, on a given request (or, for the request id `@setup`, as its group starts), once (unset,
every hook does nothing). Several faults: specs joined by `;`.

    TP_RANK_CRASH_ONCE="<rank>:<request id>=<marker file>"
    TP_RANK_HANG_ONCE="<rank>:<request id>=<marker file>"
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..engine import Request

RANK_CRASH_ONCE_ENV = "TP_RANK_CRASH_ONCE"   # fault injection for tests: "<rank>:<request id>=<marker file>"
RANK_HANG_ONCE_ENV = "TP_RANK_HANG_ONCE"     # the same, for a rank that stops answering


SETUP = "@setup"        # the request id of a fault as the group starts (TPWorker.setup)


def fault_marker(env_name: str, rank: int, ids: set[str]) -> str | None:
    """The marker file of a fault of `env_name` ("<rank>:<request id>=<marker file>", several joined
    by ";") that is this rank's, for one of `ids`."""
    for spec in filter(None, os.environ.get(env_name, "").split(";")):
        target, rest = spec.split(":", 1)
        request_id, marker = rest.split("=", 1)
        if int(target) == rank and request_id in ids:
            return marker
    return None


def fail_once_on(rank: int, requests: list[Request]) -> None:
    """With TP_RANK_CRASH_ONCE="<rank>:<request id>=<marker file>", that rank's process dies as a killed
    one would (no exception, no cleanup) when it receives that request, once (it writes the marker
    first); with TP_RANK_HANG_ONCE, it stops there for ever instead (a wedged device: the group's
    collectives wait on it). Tests use them to break a group mid-job; unset, they do nothing."""
    # A request streamed through EngineLoop is named "<n>#<its own id>".
    fail_once_at(rank, {i for r in requests for i in (r.request_id, r.request_id.split("#", 1)[-1])})


def fail_once_at(rank: int, ids: set[str]) -> None:
    """fail_once_on's faults for the request ids `ids` (SETUP: the group's start)."""
    marker = fault_marker(RANK_CRASH_ONCE_ENV, rank, ids)
    if marker:
        die_once(marker)
    marker = fault_marker(RANK_HANG_ONCE_ENV, rank, ids)
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(1e9)


def die_once(marker: str) -> None:
    """Die as a killed process would (no exception, no cleanup) unless `marker` exists, writing it
    first: the retry goes through. The fault-injection hooks of tests (here and pipeline.generate)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
