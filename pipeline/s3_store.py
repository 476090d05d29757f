"""s3fs's filesystem, its uploads sent without `Expect: 100-continue`, its failed requests logged.

botocore asks for a "100 Continue" before every upload's body, and aiohttp waits for it with no
timeout (its read timeout starts once the body is sent): a store that took the connection and never
answered (an overloaded proxy, a stalled endpoint) held a run's write for ever, with no error. Sent
at once, the body is followed by the read timeout and the retries every other request has.

botocore retries a failure that may pass without a word: a run waiting out a store's outage (a
minute or more with a run's retries) only stalled its progress line. A failed request is logged, at
most one line every QUIET_S seconds a process, with how many more failed meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time

import s3fs
from botocore.handlers import add_expect_header
from fsspec.asyn import sync_wrapper

from .storage import redact_urls

QUIET_S = 10.0
log = logging.getLogger(__name__)


class FailureLog:
    """Failed requests, logged one line at most every QUIET_S seconds."""

    def __init__(self) -> None:
        self._lock, self._last, self._unsaid = threading.Lock(), -QUIET_S, 0

    def __call__(self, attempts: int = 1, caught_exception: BaseException | None = None, response=None,
                 operation=None, **_) -> None:      # botocore's needs-retry event: its answer decides, not ours
        cause = failure(caught_exception, response)
        if cause is None:
            return
        with self._lock:
            now, self._unsaid = time.monotonic(), self._unsaid + 1
            if now - self._last < QUIET_S:
                return
            others, self._last, self._unsaid = self._unsaid - 1, now, 0
        more = f" (and {others} more since the last such line)" if others else ""
        log.warning("S3 %s failed, attempt %d: %s%s; botocore tries again while its retries last",
                    getattr(operation, "name", "request"), attempts, redact_urls(cause), more)


def failure(error: BaseException | None, response) -> str | None:
    """A failed attempt's cause: the exception raised, or an answer of a 5xx / 429 status."""
    if error is not None:
        return f"{type(error).__name__}: {error}"
    status = getattr(response[0], "status_code", 200) if response else 200
    if status >= 500 or status == 429:
        code = (response[1] or {}).get("Error", {}).get("Code", "")
        return f"HTTP {status} {code}".rstrip()
    return None


FAILURES = FailureLog()


class S3Store(s3fs.S3FileSystem):
    async def set_session(self, refresh: bool = False, kwargs: dict | None = None):
        client = await super().set_session(refresh, kwargs or {})
        client.meta.events.unregister("before-call.s3", add_expect_header)
        client.meta.events.register("needs-retry.s3", FAILURES, unique_id="idefics3-failure-log")
        return client

    _connect = set_session
    connect = sync_wrapper(set_session)
