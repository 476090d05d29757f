"""EngineLoop: one thread drives an engine; callers on other threads submit batches of requests
to it, and each batch's requests join the decode steps of those already running.

Without it, callers with one batch each are answered one batch at a time: the device decodes a
batch's longest answer alone while the slots of its finished requests wait for the next batch
(the pipeline's model stage: pipeline.generate.Generate; a tensor-parallel group's rank 0 runs
one over its ranks: model.parallel.worker.TPWorker.serve). A step that fails takes every
running request with it; those are then run one at a time, so a failure names its own request
and the others are still answered.

Two failures are the process's, not the rows': a call into the engine that never returns (a
collective waiting for a rank that hangs, a wedged device: with `stall_timeout_s`, a watchdog sees
a step, an add or an abort run that long, time in torch.compile not counted), and a step that
fails on a device that no longer works (a CUDA illegal address or device-side assert poisons the
context: every later row would fail too). Both call `on_fatal(reason)`, whose default ends the
process, so that a supervisor (Ray restarting an actor) can start over and retry the rows.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace
from typing import Callable

from ..compiling import compile_seconds

log = logging.getLogger(__name__)
_STOP = object()            # close(): the inbox's last item
FATAL_EXIT_CODE = 75        # the process ended to be restarted (EX_TEMPFAIL)
COMPILE_LIMIT_S = 3600.0    # time compiling is not stalling, up to this: a compile that long is a hang


def exit_process(reason: str) -> None:
    """on_fatal's default: a hung call or a poisoned device cannot be mended from Python; only a new
    process recovers (logging first: the exit skips every clean-up)."""
    log.critical("%s: ending this process to be restarted", reason)
    logging.shutdown()
    os._exit(FATAL_EXIT_CODE)


class Submission:
    """One batch's requests (row key -> Request) and the future of their outcomes (Result or exception)."""

    def __init__(self, requests: dict) -> None:
        self.requests, self.outcomes, self.future = requests, {}, Future()
        if not requests:
            self.future.set_result({})

    def settle(self, key, outcome) -> None:
        self.outcomes[key] = outcome
        if len(self.outcomes) == len(self.requests):
            with contextlib.suppress(InvalidStateError):    # its caller cancelled it (at any moment: another thread)
                self.future.set_result(self.outcomes)


class EngineLoop:
    """Serves `submit(requests)` from an engine with the streaming API (check_request / add_requests /
    step / has_unfinished / abort) and `device_ok`: LLMEngine, or a TP group's rank 0 (TPWorker)."""

    def __init__(self, engine, *, stall_timeout_s: float | None = None,
                 on_fatal: Callable[[str], None] = exit_process) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, tuple[Submission, object]] = {}      # engine request id -> (submission, key)
        self._suspects: list[tuple[Submission, object]] = []       # rows of a failed step, to run alone
        self._ids = itertools.count()
        self._closed = self._stopping = False
        self._closing = threading.Lock()        # submit's check and put, and close's, one at a time
        self._busy: tuple[float, float] | None = None   # the engine call running: its start, compile_seconds() then
        self._on_fatal = on_fatal
        self._thread = threading.Thread(target=self._serve, name="engine-loop", daemon=True)
        self._thread.start()
        if stall_timeout_s:
            threading.Thread(target=self._watch, args=(stall_timeout_s,), name="engine-watchdog",
                             daemon=True).start()

    def submit(self, requests: dict) -> Future:
        """Future of {key: Result | Exception}, one entry per request."""
        submission = Submission(requests)
        with self._closing:     # else a close() between the check and the put leaves it behind the stop, unread
            if self._closed:
                raise RuntimeError("submit() on a closed EngineLoop")
            if requests:
                self._inbox.put(submission)
        return submission.future

    def close(self) -> None:
        """Answer what was submitted, then stop the thread."""
        with self._closing:
            self._closed = True
            self._inbox.put(_STOP)
        self._thread.join()

    def _watch(self, timeout_s: float) -> None:
        """Time a call spends in torch.compile does not count (a replica's first decode step compiles
        for minutes), up to COMPILE_LIMIT_S."""
        while self._thread.is_alive():
            time.sleep(min(timeout_s / 4, 5.0))
            busy = self._busy
            if busy is None:
                continue
            elapsed = time.monotonic() - busy[0]
            compiling = compile_seconds() - busy[1]
            if elapsed - compiling > timeout_s or compiling > COMPILE_LIMIT_S:
                self._on_fatal(f"a call into the engine (step, add, abort) has not returned for "
                               f"{elapsed:.0f} s ({compiling:.0f} s of it compiling)")
                return

    @contextlib.contextmanager
    def _watched(self):
        self._busy = (time.monotonic(), compile_seconds())
        try:
            yield
        finally:
            self._busy = None

    def _step(self) -> list:
        with self._watched():
            return self.engine.step()

    def _abort(self) -> None:
        with self._watched():
            self.engine.abort()

    def _serve(self) -> None:
        while not (self._stopping and not self.engine.has_unfinished() and not self._suspects):
            try:
                self._turn()
            except BaseException as e:       # a bug here (or a Rust library's panic, a BaseException)
                # must not end the thread and leave every caller waiting for ever
                log.exception("engine loop")
                failure = e if isinstance(e, Exception) else RuntimeError(f"the engine loop failed: {e!r}")
                try:
                    self._abort()
                except Exception:
                    log.exception("engine loop: abort")
                for submission, key in [*self._live.values(), *self._suspects]:
                    submission.settle(key, failure)
                self._live.clear()
                self._suspects.clear()

    def _turn(self) -> None:
        if self._suspects:
            self._run_alone(*self._suspects.pop(0))
            return
        self._take(block=not self.engine.has_unfinished())
        if not self.engine.has_unfinished():
            return
        try:
            finished = self._step()
        except Exception as e:           # each of its requests runs again, alone
            self._check_device(e)
            log.warning("a step over %d rows failed (%r); running them one at a time", len(self._live), e)
            self._suspects += self._live.values()
            self._live.clear()
            self._abort()                # the engine drops them itself, unless the step failed after its work
            return
        for result in finished:
            submission, key = self._live.pop(result.request_id)
            submission.settle(key, own_ids(result, submission.requests[key].request_id, result.request_id))

    def _check_device(self, error: Exception) -> None:
        """After a failed call: a device that no longer works (its check watched too: on a wedged
        GPU it never returns) ends the process, to be restarted, rather than fail every row after."""
        with self._watched():
            ok = self.engine.device_ok()
        if not ok:
            self._on_fatal(f"a step failed ({error!r}) and the device no longer works")

    def _take(self, block: bool) -> None:
        """Add the waiting submissions' requests to the engine (wait for one if `block`)."""
        try:
            submission = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            if submission is _STOP:
                self._stopping = True
                return
            self._add_all(submission)
            try:
                submission = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add_all(self, submission: Submission) -> None:
        """Its requests added; a panic while adding one (past _add's `except Exception`) settles the
        ones not added before _serve's handler settles those that were."""
        keys = list(submission.requests)
        for k, key in enumerate(keys):
            try:
                self._add(submission, key, submission.requests[key])
            except BaseException as e:
                failure = RuntimeError(f"the engine loop failed: {e!r}")
                for unread in keys[k:]:
                    submission.settle(unread, failure)
                raise

    def _add(self, submission: Submission, key, request) -> None:
        uid = f"{next(self._ids)}#{request.request_id}"   # row ids may repeat across batches
        try:
            self.engine.check_request(request)            # its error names the row's own request id
            with self._watched():
                self.engine.add_requests([replace(request, request_id=uid)])
        except Exception as e:
            submission.settle(key, e)
            return
        self._live[uid] = (submission, key)

    def _run_alone(self, submission: Submission, key) -> None:
        """The request alone in the engine, step by step (each step watched like any other)."""
        outcome: object = RuntimeError("the engine dropped the request unanswered")
        try:
            with self._watched():
                self.engine.add_requests([submission.requests[key]])
            finished = []
            while not finished and self.engine.has_unfinished():
                finished = self._step()
            outcome = finished[0] if finished else outcome
        except Exception as e:
            outcome = e
            self._check_device(e)       # a device lost now is not this row's doing
            self._abort()               # may fail too (a tensor-parallel group a rank left): _serve's to handle
        finally:
            submission.settle(key, outcome)     # popped from the suspects: nothing else would


def own_ids(result, request_id: str, internal: str):
    """A result, and its samples (each named after the request), under the caller's request id (also
    in their errors, which named the `internal` one the loop gave the engine)."""
    def owned(one):
        error = one.error and one.error.replace(repr(internal), repr(request_id))
        return replace(one, request_id=request_id, error=error)

    samples = [owned(s) for s in result.samples] if result.samples else result.samples
    return replace(owned(result), samples=samples)
