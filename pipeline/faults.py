"""Fault injection for the tests of the pipeline's recovery: real process deaths and hangs, set
through environment variables on the workers (unset, every hook does nothing).

    PIPELINE_CRASH_ONCE="<row id>=<marker file>"   the replica that gets the row dies, once
    PIPELINE_HANG_ONCE="<row id>=<marker file>"    its next engine step never returns, once
    PIPELINE_CRASH_ALWAYS="<stage>:<row id>,..."   the stage's process dies whenever it works on the row
    PIPELINE_CRASH_ON_LOAD="1"                     a model replica's process dies whenever it loads the model

"Once": the hook writes the marker first, so the retry on the restarted process goes through.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

CRASH_ONCE_ENV = "PIPELINE_CRASH_ONCE"
HANG_ONCE_ENV = "PIPELINE_HANG_ONCE"
CRASH_ALWAYS_ENV = "PIPELINE_CRASH_ALWAYS"
CRASH_ON_LOAD_ENV = "PIPELINE_CRASH_ON_LOAD"


def fault_marker(env_name: str, ids: list) -> str | None:
    """The marker file of the fault `env_name` = "<row id>=<marker file>" if that row is among `ids`."""
    spec = os.environ.get(env_name)
    if not spec:
        return None
    row_id, marker = spec.split("=", 1)
    return marker if row_id in map(str, ids) else None


def crash_once_on(ids: list) -> None:
    """Die as a killed process would (no exception, no cleanup)."""
    marker = fault_marker(CRASH_ONCE_ENV, ids)
    if marker:
        from model.parallel.faults import die_once

        die_once(marker)


def hang_once_on(engine, ids: list) -> None:
    """The engine's next step never returns (as a wedged device's); the replica's watchdog must end it."""
    marker = fault_marker(HANG_ONCE_ENV, ids)
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        engine.step = lambda: time.sleep(1e9)


def crash_always_on(stage: str, ids: list) -> None:
    """A poison row: its stage's process dies every time it works on it."""
    poison = {tuple(s.split(":", 1)) for s in os.environ.get(CRASH_ALWAYS_ENV, "").split(",") if s}
    if any((stage, i) in poison for i in map(str, ids)):
        os._exit(1)


def crash_on_load() -> None:
    """A model too big for the node: its replica's process is killed whenever it loads it."""
    if os.environ.get(CRASH_ON_LOAD_ENV):
        os._exit(1)
