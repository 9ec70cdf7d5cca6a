"""The durable floor: the bare granian app of floor_app.py, but every 201 waits for a group-committed fsync.

Each POST appends its body (length-prefixed) to a buffer and awaits a future; one flusher thread takes
the whole buffer, writes it to `$DURABLE_FLOOR_FILE` (default: a file in the working directory) and
fdatasyncs it, then resolves the futures of that batch through the event loop, exactly like the
gateway's group commit (batch = whatever arrived during the previous fsync, at most
`BATCH_RECORDS_MAX`). Nothing else happens per request, so its knee is the physical limit of a
durable acknowledgement on this disk with this HTTP server: the gateway's knee divided by it says how
much of that limit the gateway keeps.

Run: DURABLE_FLOOR_FILE=/tmp/floor.wal granian --interface rsgi --working-dir bench durable_floor_app:app
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from typing import Any

from floor_app import BODY, HEADERS, answered_without_work

BATCH_RECORDS_MAX = 4096
PENDING_RECORDS_MAX = 65_536
UNAVAILABLE = b'{"error":{"type":"api_error","code":"storage_saturated"}}'


class GroupCommit:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lock = threading.Condition()
        self.buf: list[bytes] = []
        self.futures: list[asyncio.Future[None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._flusher, name="durable-floor-flusher", daemon=True).start()

    def append(self, record: bytes) -> asyncio.Future[None] | None:
        loop = self.loop or asyncio.get_running_loop()
        self.loop = loop
        fut: asyncio.Future[None] = loop.create_future()
        with self.lock:
            if len(self.futures) >= PENDING_RECORDS_MAX:
                return None
            self.buf.append(struct.pack("<I", len(record)) + record)
            self.futures.append(fut)
            self.lock.notify()
        return fut

    def _flusher(self) -> None:
        while True:
            with self.lock:
                while not self.buf:
                    self.lock.wait()
                n = min(len(self.buf), BATCH_RECORDS_MAX)
                batch, self.buf = self.buf[:n], self.buf[n:]
                futures, self.futures = self.futures[:n], self.futures[n:]
            os.write(self.fd, b"".join(batch))
            os.fdatasync(self.fd)
            assert self.loop is not None
            self.loop.call_soon_threadsafe(_resolve, futures)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for f in futures:
        if not f.done():
            f.set_result(None)


_commit: GroupCommit | None = None


async def app(scope: Any, proto: Any) -> None:
    global _commit
    if answered_without_work(scope, proto):
        return
    if scope.method == "POST":
        body = await proto()
        if _commit is None:
            _commit = GroupCommit(os.environ.get("DURABLE_FLOOR_FILE", "durable-floor.wal"))
        fut = _commit.append(body)
        if fut is None:
            proto.response_bytes(503, HEADERS, UNAVAILABLE)
            return
        await fut
        proto.response_bytes(201, HEADERS, BODY)
        return
    proto.response_bytes(200, HEADERS, BODY)
