"""Image bytes for a block of rows: inline bytes as they are, paths and URLs read together.

A block's files are read concurrently by a pool of threads (object stores answer each GET after
tens of milliseconds; one at a time, a CPU worker would mostly wait), through one filesystem
instance per protocol and options in the process (storage.reader_fs), and a file named by several
rows is read once. A read that fails for a reason that may pass (a timeout, a reset connection,
throttling, a 5xx) is tried again after a back-off; a missing or forbidden file is not. Every row
gets its bytes or a RowError that names what it asked for and why that failed.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .rows import RowError
from .storage import reader_fs

PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError,
             ImportError, NotImplementedError)      # ImportError: a protocol whose package is not installed
RETRYABLE_STATUS = (408, 429)


def image_source(value) -> bytes | str:
    """Binary, HF datasets' {bytes, path} struct, or a path/URL string -> the bytes, or the URL to read."""
    if value is None:
        raise RowError("image is null")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise RowError("image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value
    raise RowError(f"image has unsupported type {type(value).__name__} (want bytes, {{bytes, path}} or a path)")


def is_transient(error: BaseException) -> bool:
    """Whether trying the same read again may succeed: not for a missing or forbidden file, nor for
    an HTTP 4xx other than a timeout or throttling (aiohttp's errors carry `status`)."""
    status = getattr(error, "status", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in RETRYABLE_STATUS:
        return False
    return not isinstance(error, PERMANENT)


class ImageFetcher:
    def __init__(self, storage_options: dict | None = None, *, threads: int = 16, attempts: int = 3,
                 backoff_s: float = 0.5) -> None:
        self.storage_options = storage_options
        self.attempts, self.backoff_s = attempts, backoff_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="image-fetch")

    def fetch(self, values: list) -> list[bytes | RowError]:
        """Each row's image bytes, or the RowError saying why it has none (never raises)."""
        out: list[bytes | RowError | None] = [None] * len(values)
        rows_of: dict[str, list[int]] = {}
        for i, value in enumerate(values):
            try:
                source = image_source(value)
            except RowError as e:
                out[i] = e
                continue
            if isinstance(source, bytes):
                out[i] = source
            else:
                rows_of.setdefault(source, []).append(i)
        for url, data in zip(rows_of, self._pool.map(self.read, rows_of)):
            for i in rows_of[url]:
                out[i] = data
        return out

    def read(self, url: str) -> bytes | RowError:
        for attempt in range(1, self.attempts + 1):
            try:
                fs, path = reader_fs(url, self.storage_options)
                return fs.cat_file(path)
            except Exception as e:  # missing file, no permission, network: the row fails, not the job
                if attempt == self.attempts or not is_transient(e):
                    tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                    return RowError(f"cannot read image {url!r}{tries}: {type(e).__name__}: {e}")
                time.sleep(self.backoff_s * 2 ** (attempt - 1))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
