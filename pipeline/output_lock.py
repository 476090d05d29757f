"""One run an output at a time. Two runs of one output (two resumes started at once) each answered the
rows its checkpoint did not hold yet, and each removed the other's uncommitted files: the output held
rows twice, which no later resume removes.

A local output's run holds an exclusive lock on `<output>.lock` from its preparation to its end; the
kernel frees it whatever ends the process (SIGKILL too), so no stale lock is left to clear by hand.
Object stores offer no lock that fsspec can take: an output there is the user's to run once at a time.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

import fsspec

from .storage import is_local, redact_url, sibling

LOCK_SUFFIX = ".lock"


class OutputBusyError(FileExistsError):
    """Another run holds the output's lock."""


class OutputLock:
    def __init__(self, output_uri: str) -> None:
        self.path = Path(fsspec.core.strip_protocol(sibling(output_uri, LOCK_SUFFIX))).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.release()
            raise OutputBusyError(f"output {redact_url(output_uri)!r} is being written by another run ({holder}): "
                                  "one run an output at a time; wait for it to end, or stop it and --resume") from None
        self._file.truncate(0)      # append mode: the record is then the file's only text
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self._file.flush()

    def _holder(self) -> str:
        self._file.seek(0)
        try:
            found = json.loads(self._file.read())
            return f"process {found['pid']} on {found['host']}, since {found['since']}"
        except (ValueError, KeyError, TypeError):
            return "its record not written yet"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()      # closing frees the lock
            self._file = None


def lock_output(output_uri: str) -> OutputLock | None:
    """The output's lock, taken (OutputBusyError if another run holds it); None for an object store's."""
    return OutputLock(output_uri) if is_local(output_uri) else None
