"""Image bytes for a block of rows: inline bytes as they are, paths and URLs read together.

A block's files are read concurrently by a pool of threads (object stores answer each GET after
tens of milliseconds; one at a time, a CPU worker would mostly wait), through one filesystem
instance per protocol and options in the process (storage.reader_fs), and a file named by several
rows is read once. A read that fails for a reason that may pass (a timeout, a reset connection,
throttling, a 5xx, no answer within the timeout) is tried again after a back-off; a missing or forbidden file is not. Every row
gets its bytes or a RowError that names what it asked for and why that failed.

Each file is read by one ranged GET of at most one byte past the size limit: a file that is not an
image (a video, an archive, a multi-GB scan) costs that much memory, not its size; and s3fs, asked
for a whole object, first sends a HEAD for its size: a second round trip per image.
"""
from __future__ import annotations

import base64
import binascii
import errno
import os
import posixpath
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from fsspec.asyn import sync

from processing.decode import DEFAULT_MAX_BYTES
from processing.sniff import sniff

from .rows import RowError
from .storage import S3_PROTOCOLS, protocol_of, reader_fs, redact_url, redact_urls

PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
PERMANENT_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP)
MAX_PATH = 4096     # Linux's PATH_MAX: a longer string names no file
RETRYABLE_STATUS = (408, 429)
TRANSPORT_ERRORS = {"aiohttp": ("ClientConnectionError", "ClientPayloadError"),
                    "botocore.exceptions": ("ConnectionError", "HTTPClientError")}


def network_errors() -> tuple[type[BaseException], ...]:
    """Failures of the transport rather than of the request: OSError (timeouts, resets, s3fs's
    unmapped S3 errors) and the connection / payload errors of aiohttp and botocore, which are not
    OSErrors. Both come with s3fs; an error of either can only come once it is imported, and
    importing aiohttp here cost each preprocessing actor's start 0.25 CPU-s. A module that another
    thread is still importing is in sys.modules without all its classes: one not yet made is one
    no read can have raised."""
    kinds: list[type[BaseException]] = [OSError]
    for module, names in TRANSPORT_ERRORS.items():
        kinds += [kind for name in names if (kind := getattr(sys.modules.get(module), name, None))]
    return tuple(kinds)


def image_source(value) -> bytes | str:
    """Binary, HF datasets' {bytes, path} struct, or a path/URL string -> the bytes (a data: URL's
    too), or the URL to read."""
    if value is None:
        raise RowError("image is null")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return image_source(value["path"])
        raise RowError("image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        if value[:5].lower() == "data:":
            return data_url_bytes(value)
        if not value.strip():
            raise RowError("image path is empty")
        found = base64_image(value)
        if found is None and len(value) > MAX_PATH:
            raise RowError(f"image string of {len(value)} characters is not a path or URL, nor an image in base64 "
                           f"(it starts {value[:40]!r})")
        return value if found is None else found
    raise RowError(f"image has unsupported type {type(value).__name__} (want bytes, {{bytes, path}} or a path)")


def base64_image(text: str) -> bytes | None:
    """The bytes of an image given in bare base64 (benchmarks from TSV files keep them so; the library's
    processor reads them too, as the reference's), or None where the string is a path or a URL: its
    first 16 characters must decode to an image format's signature ("iVBORw0KGgo" a PNG's)."""
    try:
        found = sniff(base64.b64decode(text[:16], validate=True))
    except (binascii.Error, ValueError):
        return None
    if found is None or found.kind != "image":
        return None
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(f"image string starts as a {found.what} image in base64 but is not valid base64: {e}") \
            from None


def data_url_bytes(url: str) -> bytes:
    """The bytes a data: URL carries (RFC 2397: `data:image/png;base64,...`, as OpenAI-style
    messages and web scrapes hold images), base64 or percent-encoded."""
    media_type, comma, payload = url[5:].partition(",")
    if not comma:
        raise RowError(f"the data URL {url[:40]!r}... has no ',' before its data")
    if not media_type.lower().endswith(";base64"):
        return unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(unquote(payload).split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(f"the data URL {url[:40]!r}... holds invalid base64: {e}") from None


def local_path(url: str) -> str:
    """A file: URL's path, percent-decoded (`Path.as_uri()` writes a space as %20)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise RowError(f"the file URL {url!r} names another host ({parts.netloc}): only local files are read")
    return unquote(parts.path)


def is_transient(error: BaseException) -> bool:
    """Whether trying the same read again may succeed: after an HTTP 5xx, 408 or 429 (aiohttp's
    errors carry `status`) or a network failure; not for a missing or forbidden file, missing
    credentials, an unknown protocol or any other 4xx."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status >= 500 or status in RETRYABLE_STATUS
    if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS:
        return False
    return isinstance(error, network_errors()) and not isinstance(error, PERMANENT)


def is_range_not_satisfiable(error: BaseException) -> bool:
    """A ranged read of an empty object: HTTP 416 (aiohttp's `status`, gcsfs' `code`; s3fs's OSError
    says "The requested range is not satisfiable")."""
    if 416 in (getattr(error, "status", None), getattr(error, "code", None)):
        return True
    return isinstance(error, OSError) and "not satisfiable" in str(error).lower()


async def bounded_http_read(fs, url: str, limit: int) -> bytes:
    """The first `limit` bytes at an HTTP(S) URL (fsspec's HTTPFileSystem `fs`), streamed: a server
    that ignores Range (Python's http.server, some CDNs) sends the whole file, of which no more than
    `limit` bytes are read; fsspec's cat_file would hold all of it first."""
    kw = dict(fs.kwargs)
    kw["headers"] = {**kw.get("headers", {}), "Range": f"bytes=0-{limit - 1}"}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **kw) as response:
        fs._raise_not_found_for_status(response, url)
        data = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) >= limit:
                break           # leaving the response unread closes its connection
    return bytes(data[:limit])


def s3_pool_options(storage_options: dict | None, threads: int) -> dict:
    """A connection for each reading thread: botocore keeps 10 (max_pool_connections), and a read
    waiting for one spends its timeout waiting, behind a few slow objects. A setting given is kept."""
    options = dict(storage_options or {})
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", max(threads, 10))
    return {**options, "config_kwargs": config}


class ImageFetcher:
    def __init__(self, storage_options: dict | None = None, *, root: str | None = None, threads: int = 16,
                 attempts: int = 3, timeout_s: float = 60.0, backoff_s: float = 0.5,
                 max_bytes: int | None = None) -> None:
        self.storage_options, self.s3_options = storage_options, s3_pool_options(storage_options, threads)
        self.root = unquote(urlsplit(root).path) if root and root[:5].lower() == "file:" else root
        self.max_bytes = max_bytes or DEFAULT_MAX_BYTES
        self.attempts, self.timeout_s, self.backoff_s = attempts, timeout_s, backoff_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="image-fetch")

    def fetch(self, values: list) -> list[bytes | RowError]:
        """Each row's image bytes, or the RowError saying why it has none (never raises)."""
        out: list[bytes | RowError | None] = [None] * len(values)
        rows_of: dict[str, list[int]] = {}
        for i, value in enumerate(values):
            try:
                source = image_source(value)
                if isinstance(source, bytes):
                    out[i] = source
                else:
                    rows_of.setdefault(self.resolve(source), []).append(i)
            except RowError as e:
                out[i] = e
        for url, data in zip(rows_of, self._pool.map(self.read, rows_of)):
            for i in rows_of[url]:
                out[i] = data
        return out

    def resolve(self, path: str) -> str:
        """A URL or an absolute path as it is (a file: URL as its path); a relative path under `root`
        (a dataset's rows name their images relative to it; a Ray worker's current directory means
        nothing to the user)."""
        if path[:5].lower() == "file:":
            return local_path(path)
        if self.root is None or "://" in path or os.path.isabs(path):
            return path
        if "://" not in self.root:
            return self.root.rstrip("/") + "/" + path
        scheme, _, root = self.root.partition("://")        # ./ and ../ as a local path's: keys have no such parts
        return f"{scheme}://{posixpath.normpath(root.rstrip('/') + '/' + path)}"

    def read(self, url: str) -> bytes | RowError:
        for attempt in range(1, self.attempts + 1):
            try:
                data = self._read_once(url)
                if len(data) > self.max_bytes:
                    return RowError(f"image file {redact_url(url)!r} is larger than the limit of {self.max_bytes} "
                                    f"bytes (max_image_bytes)")
                return data
            except Exception as e:  # missing file, no permission, network: the row fails, not the job
                if attempt == self.attempts or not is_transient(e):
                    tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                    why = str(e) or (f"no answer within {self.timeout_s:g} s" if isinstance(e, TimeoutError) else "")
                    # the error may quote the URL as its client rewrote it (%2F as /): every URL in it redacted
                    return RowError(f"cannot read image {redact_url(url)!r}{tries}: {type(e).__name__}: "
                                    f"{redact_urls(why.replace(url, redact_url(url)))}")
                time.sleep(self.backoff_s * 2 ** (attempt - 1))

    def options_for(self, url: str) -> dict | None:
        """The job's storage options, for its own store: an image on another web host gets none (they
        were sent to every host a row named, an Authorization header too, and `{"anon": true}`, an S3
        setting, failed every https image)."""
        protocol = protocol_of(url)
        if protocol in S3_PROTOCOLS:
            return self.s3_options
        if protocol in ("http", "https") and urlsplit(url).netloc != urlsplit(self.root or "").netloc:
            return None
        return self.storage_options

    def _read_once(self, url: str) -> bytes:
        fs, path = reader_fs(url, self.options_for(url))
        # fsspec's sync() cancels an async store's read past `timeout` (FSTimeoutError, worth another
        # try): a server that accepts and never answers costs one attempt, not aiohttp's 5 minutes.
        timeout = {"timeout": self.timeout_s} if getattr(fs, "async_impl", False) else {}
        try:
            if url.startswith(("http://", "https://")):
                return sync(fs.loop, bounded_http_read, fs, path, self.max_bytes + 1, **timeout)
            if protocol_of(url) in ("file", "local") and not stat.S_ISREG(os.stat(path).st_mode):
                # a pipe's read waits for a writer for ever (no timeout applies to local reads); a device's never ends
                raise ValueError("not a regular file (a pipe, a device or a folder)")
            return fs.cat_file(path, start=0, end=self.max_bytes + 1, **timeout)
        except Exception as e:
            if is_range_not_satisfiable(e):
                return b""      # the decoder names it: "image data is empty"
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
