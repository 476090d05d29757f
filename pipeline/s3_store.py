"""s3fs's filesystem, its uploads sent without `Expect: 100-continue`.

botocore asks for a "100 Continue" before every upload's body, and aiohttp waits for it with no
timeout (its read timeout starts once the body is sent): a store that took the connection and never
answered (an overloaded proxy, a stalled endpoint) held a run's write for ever, with no error. Sent
at once, the body is followed by the read timeout and the retries every other request has.
"""
from __future__ import annotations

import s3fs
from botocore.handlers import add_expect_header
from fsspec.asyn import sync_wrapper


class S3Store(s3fs.S3FileSystem):
    async def set_session(self, refresh: bool = False, kwargs: dict | None = None):
        client = await super().set_session(refresh, kwargs or {})
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client

    _connect = set_session
    connect = sync_wrapper(set_session)
