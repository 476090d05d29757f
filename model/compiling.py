"""torch.compile as the model and the engine use it: `compiled` (a compile whose time is counted) and
CompiledOrEager (a function compiled where that works, run eagerly where it does not).

The seconds this process has spent compiling are for the engine loop's watchdog: a step that compiles
(a replica's first decode step: 100-110 s at Idefics3-8B shapes on an H200 with 16 cores, longer with
fewer cores or eight tensor-parallel ranks compiling side by side) is not a hang. They are counted from
torch._dynamo's compile start/end callbacks (a private API: a torch without it counts nothing, and the
watchdog sees compiles as steps), registered by `compiled`: importing torch._dynamo costs
~2 CPU-s, which a process that never compiles (a CPU replica by default) does not spend.
"""
from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable

import torch

_lock = threading.Lock()
_running = 0                    # compiles in progress (nested frames, several threads)
_since: float | None = None     # monotonic start of the outermost one
_done_s = 0.0                   # seconds of the compiles that ended


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


def _install_clock() -> None:
    """Counts compiles from here on: again after a torch._dynamo.reset(), which drops every callback."""
    try:
        from torch._dynamo.callback import callback_handler
        with _lock:
            if _started not in getattr(callback_handler, "start_callbacks", ()):
                callback_handler.register_start_callback(_started)
                callback_handler.register_end_callback(_ended)
    except (ImportError, AttributeError):
        pass        # this torch has no compile callbacks: nothing is counted


def compile_seconds() -> float:
    """Seconds this process has spent compiling since the clock was registered, a compile in progress
    included. `compiled` registers it; so does this (read by the watchdog as each engine call starts)
    once torch._dynamo is loaded: a torch._dynamo.reset() drops it, and a function compiled before the
    reset compiles again."""
    if "torch._dynamo" in sys.modules:
        _install_clock()
    with _lock:
        return _done_s + (time.monotonic() - _since if _since is not None else 0.0)


def compiled(fn: Callable, **options) -> Callable:
    """torch.compile(fn, **options), its compiles counted in compile_seconds()."""
    _install_clock()
    return torch.compile(fn, **options)


class CompiledOrEager:
    """`fn` through torch.compile (whole, dynamic shapes), compiled at the first call. A compiler that
    fails (no Triton, an old GPU) warns once, and `fn` serves from then on. Inside another compiled
    region (the decode step) `fn` is traced as it is, into that region's kernels."""

    def __init__(self, fn: Callable, what: str) -> None:
        self.fn, self.what = fn, what
        self._run: Callable | None = None

    def __call__(self, *args):
        if torch.compiler.is_compiling() or self._run is self.fn:
            return self.fn(*args)
        if self._run is None:
            self._run = compiled(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._run(*args)
        except Exception as e:       # the eager call below raises again if the fault is the caller's
            warnings.warn(f"torch.compile of {self.what} failed, running it eagerly: {e!r}")
            self._run = self.fn
            return self.fn(*args)

    def __deepcopy__(self, memo: dict) -> "CompiledOrEager":
        return self               # no state of a model's: a copied model shares the compiled code

    def __reduce__(self):
        return CompiledOrEager, (self.fn, self.what)
