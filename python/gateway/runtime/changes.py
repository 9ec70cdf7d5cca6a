"""The change bus: wakes the requests that wait for a payment to change (`Prefer: wait=MS`).

Changes are announced by whoever persists them: in embedded mode the worker child process (one line
per change on its stdout), in cluster mode PostgreSQL's NOTIFY on `CHANGES_CHANNEL`, sent by every
committed change of any process. Announcements are hints: a waiter always re-reads the store before
it answers, and in cluster mode it also re-reads every `recheck_s`, so a lost notification delays an
answer by at most that long and never makes it wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class ChangeBus:
    """Futures per payment id, resolved on the event loop that owns them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, recheck_s: float | None) -> None:
        self.loop = loop
        # None: every change is announced (one process owns the store), so no periodic re-read.
        self.recheck_s = recheck_s
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}

    def changed(self, payment_id: str) -> None:
        """Any thread: a change of `payment_id` was persisted."""
        # Only bother the event loop when someone waits for this payment.
        if payment_id in self.waiters and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, payment_id)

    def _wake(self, payment_id: str) -> None:
        for fut in self.waiters.pop(payment_id, ()):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, payment_id: str, done: Callable[[], Awaitable[bool]], wait_ms: int) -> None:
        """Returns once `done()` is true or `wait_ms` has passed, whichever is first."""
        deadline = self.loop.time() + wait_ms / 1000
        while True:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            fut: asyncio.Future[None] = self.loop.create_future()
            self.waiters.setdefault(payment_id, set()).add(fut)
            try:
                if await done():
                    return
                timeout = remaining if self.recheck_s is None else min(remaining, self.recheck_s)
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                if self.recheck_s is None:
                    return
            finally:
                waiting = self.waiters.get(payment_id)
                if waiting is not None:
                    waiting.discard(fut)
                    if not waiting:
                        self.waiters.pop(payment_id, None)
