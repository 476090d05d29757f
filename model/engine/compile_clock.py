"""Seconds this process has spent in torch.compile, for the engine loop's watchdog: a step that
compiles (a replica's first decode step: 100-110 s at Idefics3-8B shapes on an H200 with 16 cores,
longer with fewer cores or eight tensor-parallel ranks compiling side by side) is not a hang.

Counted from torch._dynamo's compile start/end callbacks (a private API: a torch without it counts
nothing, and the watchdog sees compiles as steps, as before).
"""
from __future__ import annotations

import threading
import time

_lock = threading.Lock()
_running = 0                    # compiles in progress (nested frames, several threads)
_since: float | None = None     # monotonic start of the outermost one
_done_s = 0.0                   # seconds of the compiles that ended
_installed = False


def _started(*_) -> None:        # callbacks take CallbackArgs in newer torch, nothing in older
    global _running, _since
    with _lock:
        if _running == 0:
            _since = time.monotonic()
        _running += 1


def _ended(*_) -> None:
    global _running, _since, _done_s
    with _lock:
        if _running == 0:
            return
        _running -= 1
        if _running == 0:
            _done_s += time.monotonic() - _since
            _since = None


def install() -> bool:
    """Starts counting (once per process); False where this torch has no compile callbacks."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from torch._dynamo.callback import callback_handler
            callback_handler.register_start_callback(_started)
            callback_handler.register_end_callback(_ended)
        except (ImportError, AttributeError):
            return False
        _installed = True
        return True


def compile_seconds() -> float:
    """Seconds spent compiling since install(), a compile in progress included."""
    with _lock:
        return _done_s + (time.monotonic() - _since if _since is not None else 0.0)
