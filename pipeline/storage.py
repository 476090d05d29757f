"""Filesystems for any fsspec URL: local paths, s3:// (s3fs), and the rest, configured the standard way.

S3 credentials and region come from the AWS environment and config files (boto's own chain);
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` point at S3-compatible stores; `storage_options` (the
`--storage-options` JSON) is passed to the fsspec filesystem and wins over both.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import os
import posixpath
import re
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs


S3_PROTOCOLS = ("s3", "s3a")
# S3's client as s3fs sets it up (botocore's "legacy" retries) gives up on a store that refuses
# connections within 15 s (7.5 s on average), and on throttling (SlowDown) after 4 retries: a blip
# that ended a run of hours. Within patient_stores() (a run, once its checks have passed; an actor's
# copy of the model) it takes botocore's "standard" retries instead: 10 retries, waits of up to 20 s,
# ~65 s in all on average, within a budget of retries that a client's concurrent requests share
# (a worker's write has a client of its own). Unless the storage options or the AWS environment
# choose the retries.
PATIENT_RETRIES = {"max_attempts": 10, "mode": "standard"}
RETRY_ENVIRONMENT = ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")
_PATIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("patient_stores", default=False)


@contextlib.contextmanager
def patient_stores() -> Iterator[None]:
    """The stores opened within (by this thread; a filesystem handed to Ray's workers goes with its
    options) wait out their passing trouble (PATIENT_RETRIES). The driver's checks before a run are
    not patient: a wrong endpoint is named in seconds."""
    token = _PATIENT.set(True)
    try:
        yield
    finally:
        _PATIENT.reset(token)


def _options(protocol: str, storage_options: dict | None) -> dict:
    options = copy.deepcopy(storage_options or {})      # botocore rewrites a config's retries in place
    if protocol in S3_PROTOCOLS:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = options.get("client_kwargs") or {}
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            options["endpoint_url"] = endpoint
        config = options.get("config_kwargs") or {}
        chosen = "retries" in config or any(os.environ.get(name) for name in RETRY_ENVIRONMENT)
        if _PATIENT.get() and not chosen:
            options["config_kwargs"] = {**config, "retries": dict(PATIENT_RETRIES)}
    return options


def protocol_of(uri: str) -> str:
    return fsspec.core.split_protocol(uri)[0] or "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def absolute_location(uri: str) -> str:
    """A local path made absolute (`~` expanded, `.` and a trailing `/` resolved); a URL as it is.
    What is kept beside an output (`<output>.summary.json`, `.checkpoint`, `.lock`) was put inside
    the folder `.` as `..summary.json` and the rest, and `~/out` (unexpanded, as in `--output=~/out`)
    was a folder named `~`."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def lists_folders(uri: str) -> bool:
    """Whether the store of `uri` can say if a folder exists (local disks and object stores; HTTP cannot)."""
    return is_local(uri) or protocol_of(uri) in (*S3_PROTOCOLS, "gs", "gcs", "az", "abfs", "abfss")


def fsspec_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for `uri`; local paths come back absolute."""
    if is_local(uri):
        return fsspec.filesystem("file"), os.path.abspath(fsspec.core.strip_protocol(uri))
    protocol = protocol_of(uri)
    options = _options(protocol, storage_options)
    # A fresh instance: fsspec's cached ones keep directory listings from before a write.
    if protocol in S3_PROTOCOLS:
        from .s3_store import S3Store      # s3fs's, uploads without waiting for a "100 Continue"
        fs = S3Store(skip_instance_cache=True, **options)
    else:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    return fs, fs._strip_protocol(uri)


class ExactReads(pafs.FSSpecHandler):
    """Arrow asks for the byte ranges of the columns it reads; fsspec's files read ahead by blocks
    (s3fs: 50 MB), so reading the ids of a file of inline images fetched most of the file, and a
    dataset's unused columns were read with the used ones. Opened without a cache, each read is
    the range Arrow asked for; and without FSSpecHandler's isfile(), one HEAD a file less. For
    object stores, which all answer ranged reads."""

    def open_input_file(self, path: str) -> pa.PythonFile:
        return pa.PythonFile(self.fs.open(path, mode="rb", cache_type="none"), mode="r")


def arrow_fs(uri: str, storage_options: dict | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for `uri`: Arrow's own for local disk, fsspec's wrapped otherwise."""
    fs, path = fsspec_fs(uri, storage_options)
    if is_local(uri):
        return pafs.LocalFileSystem(), path
    # HTTP servers need not honour ranges (fsspec's read-ahead block can take the whole small file)
    handler = ExactReads(fs) if lists_folders(uri) else pafs.FSSpecHandler(fs)
    return pafs.PyFileSystem(handler), path


def sibling(uri: str, suffix: str) -> str:
    """`s3://b/out` + `.summary.json` -> `s3://b/out.summary.json` (next to a folder, not inside it)."""
    return uri.rstrip("/") + suffix


_READERS: dict[tuple[str, str, bool], fsspec.AbstractFileSystem] = {}
_READERS_LOCK = threading.Lock()


def reader_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like fsspec_fs, but one instance per protocol and options in a process, shared by threads: a
    stage reading many files must not set up a client (credentials, connection pool) per file
    (a fresh s3fs instance a file read 5 images/s from a loopback S3, a shared one 79)."""
    if is_local(uri):
        return fsspec_fs(uri)
    protocol = protocol_of(uri)
    key = (protocol, json.dumps(storage_options or {}, sort_keys=True, default=str), _PATIENT.get())
    with _READERS_LOCK:
        if key not in _READERS:
            _READERS[key] = fsspec_fs(uri, storage_options)[0]
        fs = _READERS[key]
    return fs, fs._strip_protocol(uri)


def write_text(uri: str, text: str, storage_options: dict | None = None) -> None:
    fs, path = fsspec_fs(uri, storage_options)
    parent = posixpath.dirname(path)
    if parent and is_local(uri):
        fs.makedirs(parent, exist_ok=True)
    replace_whole(fs, path, lambda f: f.write(text.encode()), is_local(uri))


def replace_whole(fs, path: str, write: Callable[[BinaryIO], object], local: bool) -> None:
    """The file at `path` made by `write(file)`, replaced whole: on a local disk through a hidden
    temporary file and a rename (a run stopped mid-write left a run manifest or a checkpoint file
    empty, which every resume then failed to read); an object store's PUT is whole by itself."""
    if not local:
        with fs.open(path, "wb") as f:
            write(f)
        return
    partial = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, path)
    except OSError as e:        # named after the file asked for, not the temporary one
        with contextlib.suppress(OSError):
            os.remove(partial)
        if e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, path) from None


def has_files(uri: str, storage_options: dict | None = None, ext: str = ".parquet") -> bool:
    fs, path = fsspec_fs(uri, storage_options)
    if not fs.exists(path):
        return False
    return any(p.endswith(ext) for p in fs.find(path))


def redact_url(url: str) -> str:
    """The URL as error rows may show it: no user:password, no query values (pre-signed S3 / GCS /
    Azure URLs carry signatures and tokens there, under names no list keeps up with) and no
    fragment (OAuth's #access_token=), the rest kept so the row still says which file. A local path
    is returned as it is."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment="***" if parts.fragment else ""))


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]]*[^\s'\"<>()\[\].,;:]")
# user:password@ quoted without its scheme (botocore's "Invalid bucket name \"KEY:SECRET@bucket\"")
_USER_INFO = re.compile(r"(?<![\w/:@])[^\s/@:'\"]+:(?!//)[^\s@'\"]+@(?=[\w.-])")


def redact_urls(text: str) -> str:
    """redact_url for every URL inside a message (a library's error may quote the URL it read)."""
    return _USER_INFO.sub("***@", _URL.sub(lambda m: redact_url(m.group(0)), text))


def private_temp_folder(name: str) -> Path:
    """<temp dir>/<name>-<uid>, made for this user alone (mode 0700) and checked to be theirs: in a
    shared /tmp another user could otherwise make it first, fill it (a checkpoint copy of their
    choosing, marked complete) or plant links in it that this job's writes follow."""
    folder = Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    found = folder.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise PermissionError(f"{folder} is not a folder of this user's alone (owner uid {found.st_uid}, mode "
                              f"{stat.filemode(found.st_mode)}): remove it, or name another folder")
    return folder


@contextlib.contextmanager
def reading_store(what: str, uri: str) -> Iterator[None]:
    """A store's refusal while the driver reads `what` ("input", "model": an HTTP 403 of an expired
    pre-signed URL, a 503, an endpoint it cannot reach, wrong credentials) as a PermissionError naming
    it, its URLs redacted: the job's one-line error. One that names it already is kept as it is."""
    try:
        yield
    except (FileNotFoundError, PermissionError) as e:
        if redact_url(uri) in str(e) or uri in str(e):
            raise
        # s3fs's "The specified bucket does not exist" names no bucket, nor what was read
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else PermissionError
        raise kind(f"{what} {redact_url(uri)!r} cannot be read: {redact_urls(str(e))}") from None
    except Exception as e:
        raise PermissionError(f"{what} {redact_url(uri)!r} cannot be read: {type(e).__name__}: "
                              f"{redact_urls(str(e))}") from None
