"""A lean Redis client for the two calls every cluster-mode create makes (the admission script and the
pipeline that finishes it): requests pipelined on a few long-lived connections, replies parsed by
hiredis and matched to their requests in the order they were sent.

Why: redis-py's asyncio client spends ~180 µs of CPU per create on those two calls on this machine
(connection pool, retry wrapper, timeout scopes, command packing); this client ~25 µs
(`bench/cluster_bench.py --admit-only` measures both). The other, rarer calls stay on redis-py.

Invariants:
- On one connection, replies come back in the order the requests were written, so each request
  appends its futures to the connection's queue and writes its commands in the same synchronous step.
- A reply that cannot be matched any more (a timeout, a broken connection, a protocol error) ends the
  connection: every request still waiting on it fails with `RespError`, and the next call reconnects.
- At most `inflight_max` calls are in flight per client; a call waits for room for no longer than the
  call timeout, then fails. A failure is always `RespError` (the caller answers 503), never a hang.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

CONNECTIONS = 2  # Redis runs one command at a time: more connections only add syscalls


class RespError(Exception):
    """Redis could not be reached, did not answer in time, or answered with an error."""


def pack(*args: bytes | str | float) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else (a.encode() if isinstance(a, str) else repr(a).encode())
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Script:
    """A Lua script called by its SHA1 (`EVALSHA`); where Redis has not loaded it (it restarted),
    `EVAL` runs and loads it once."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: Any = None  # asyncio's or uvloop's (not an asyncio.Transport subclass)
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                fut = waiting.popleft()
                if not fut.done():
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as e:  # a reply nobody asked for, or garbage
            self.abort(f"protocol error: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(f"connection lost: {exc or 'closed by the server'}")

    def abort(self, why: str) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
        self._fail(why)

    def _fail(self, why: str) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(RespError(why))


class RespClient:
    """`redis://[user:password@]host[:port][/db]` or `unix:///path?db=N`; `timeout_s` bounds a whole
    call (connecting included)."""

    def __init__(self, url: str, timeout_s: float, inflight_max: int) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (redis:// or unix://)")
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 6379
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        db = query.get("db") or (parts.path.strip("/") if parts.scheme == "redis" else "") or "0"
        self._hello: list[bytes] = []
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            self._hello.append(pack("AUTH", *([user] if user else []), unquote(parts.password)))
        if db != "0":
            self._hello.append(pack("SELECT", db))
        self.timeout_s = timeout_s
        self._room = asyncio.Semaphore(inflight_max)
        self._conns: list[_Connection | None] = [None] * CONNECTIONS
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * CONNECTIONS
        self._next = itertools.cycle(range(CONNECTIONS))

    def __repr__(self) -> str:  # never the password
        where = self._unix or f"{self._host}:{self._port}"
        return f"RespClient({where})"

    async def call(self, *commands: bytes) -> list[Any]:
        """Sends packed commands together and returns their replies in order (an error reply is a
        `hiredis.ReplyError` in the list, not raised)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if self._room.locked():
            try:
                async with asyncio.timeout_at(deadline):
                    await self._room.acquire()
            except TimeoutError:
                raise RespError("too many Redis calls in flight") from None
        else:
            await self._room.acquire()
        try:
            conn = await self._connection(next(self._next), deadline)
            futs = [loop.create_future() for _ in commands]
            conn.waiting.extend(futs)
            conn.transport.write(b"".join(commands))
            timer = loop.call_at(deadline, conn.abort, f"no answer within {self.timeout_s * 1000:.0f} ms")
            try:
                return [await f for f in futs]
            finally:
                timer.cancel()
        finally:
            self._room.release()

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        (reply,) = await self.call(pack(b"EVALSHA", script.sha, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            (reply,) = await self.call(pack(b"EVAL", script.source, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError):
            raise RespError(f"script failed: {reply}")
        return reply

    async def _connection(self, i: int, deadline: float) -> _Connection:
        conn = self._conns[i]
        if conn is not None and not conn.lost:
            return conn
        pending = self._connecting[i]
        if pending is None:  # one connect per slot; concurrent callers wait for the same one
            pending = self._connecting[i] = asyncio.ensure_future(self._connect(i))
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if unawaited
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(pending)
        except TimeoutError:
            raise RespError(f"could not connect within {self.timeout_s * 1000:.0f} ms") from None

    async def _connect(self, i: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._open(i, loop)
        except TimeoutError:
            raise RespError(f"could not connect within {self.timeout_s * 1000:.0f} ms") from None
        finally:
            self._connecting[i] = None

    async def _open(self, i: int, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            if self._unix is not None:
                _, conn = await loop.create_unix_connection(_Connection, self._unix)
            else:
                _, conn = await loop.create_connection(_Connection, self._host, self._port)
            if self._hello:
                futs = [loop.create_future() for _ in self._hello]
                conn.waiting.extend(futs)
                conn.transport.write(b"".join(self._hello))
                for reply in [await f for f in futs]:
                    if isinstance(reply, hiredis.ReplyError):
                        conn.abort("refused")
                        raise RespError(f"Redis refused the connection's set-up: {reply}")
        except OSError as e:
            raise RespError(f"cannot connect: {e}") from None
        self._conns[i] = conn
        return conn

    async def close(self) -> None:
        for conn in self._conns:
            if conn is not None and conn.transport is not None:
                conn.lost = True
                conn.transport.close()
        self._conns = [None] * CONNECTIONS
