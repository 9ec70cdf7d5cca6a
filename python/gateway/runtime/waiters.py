"""Requests waiting for a log position: the WAL's committed LSN, or the broker's acknowledged one."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LsnWaiters:
    """Futures in LSN order, released by one position and expired by one timer, not one per request.

    Only the event loop that owns them appends, and it appends LSNs in the order the fast path gave
    them out, so the queue stays sorted and every release or expiry only looks at its front.
    """

    def __init__(self, timeout_message: str) -> None:
        self._queue: deque[tuple[int, asyncio.Future[None], float]] = deque()
        self._timeout_message = timeout_message

    def __len__(self) -> int:
        return len(self._queue)

    def last_lsn(self) -> int:
        return self._queue[-1][0] if self._queue else 0

    def add(self, loop: asyncio.AbstractEventLoop, lsn: int, timeout_s: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.append((lsn, fut, time.monotonic() + timeout_s))
        return fut

    def release(self, position: int) -> None:
        """Resolves every waiter whose LSN is at or below `position`."""
        queue = self._queue
        while queue and queue[0][0] <= position:
            fut = queue.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    def fail_all(self, error: BaseException) -> None:
        queue = self._queue
        while queue:
            fut = queue.popleft()[1]
            if not fut.done():
                fut.set_exception(error)

    def expire(self) -> None:
        """Fails the waiters whose deadline has passed with a TimeoutError."""
        now = time.monotonic()
        queue = self._queue
        while queue and queue[0][2] <= now:
            fut = queue.popleft()[1]
            if not fut.done():
                fut.set_exception(TimeoutError(self._timeout_message))
