"""Group commit for the worker's store calls: what many payments ask for at once goes out as one batch.

Every payment is still driven by its own coroutine (so retries, timeouts and follow-up operations stay
the plain code of processing/authorize.py and friends), but its store calls are submitted here and
awaited: the first submission of a round schedules a flush on the event loop, every coroutine that
reaches the same kind of call before the flush runs joins it, and the flush makes ONE store call for
all of them (`load_many`, `record_intents`, `apply_many`: one transaction each). A flush also starts
as soon as `batch_max` items wait; `linger_s` > 0 lets a round wait that long for more items.

Invariants: a submitter resumes only after its batch is done (so an intent is committed before its
PSP call, exactly as with one transaction per call); a batch holds at most `batch_max` items; an
exception of the batch call fails every item of that batch, and only those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

BATCH_MAX_LIMIT = 1_000


class Batcher(Generic[In, Out]):
    """Collects items and runs `run_batch(items) -> results` (one result per item, in order)."""

    def __init__(self, run_batch: Callable[[list[In]], Awaitable[list[Out]]], batch_max: int,
                 linger_s: float = 0.0, name: str = "batch") -> None:
        if not 1 <= batch_max <= BATCH_MAX_LIMIT:
            raise ValueError(f"batch_max must be 1..{BATCH_MAX_LIMIT}")
        self._run_batch = run_batch
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.name = name
        self._items: list[In] = []
        self._futures: list[asyncio.Future[Out]] = []
        self._scheduled: asyncio.Handle | asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        # What the batches looked like: for the metrics and the benchmark.
        self.batches = 0
        self.items = 0
        self.singles = 0  # items submitted one at a time (`submit`), not as a list (`submit_many`)

    async def submit(self, item: In) -> Out:
        self.singles += 1
        return await self._add(item)

    async def submit_many(self, items: list[In], linger_s: float | None = None) -> list[Out]:
        """Every item joins the round (filling as many batches as it takes); the results in order.
        `linger_s`: how long a round these items start may wait for more (default: the batcher's)."""
        futures = [self._add(item, linger_s) for item in items]
        return list(await asyncio.gather(*futures)) if futures else []

    def _add(self, item: In, linger_s: float | None = None) -> asyncio.Future[Out]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Out] = loop.create_future()
        self._items.append(item)
        self._futures.append(fut)
        if len(self._items) >= self.batch_max:
            self._flush()
        elif self._scheduled is None:
            linger = self.linger_s if linger_s is None else linger_s
            self._scheduled = (loop.call_later(linger, self._flush) if linger > 0 else loop.call_soon(self._flush))
        return fut

    def _flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._items:
            return
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        self.batches += 1
        self.items += len(items)
        task = asyncio.ensure_future(self._run(items, futures))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, items: list[In], futures: list[asyncio.Future[Out]]) -> None:
        try:
            results = await self._run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        except BaseException as e:  # every waiter of this batch gets the error, and only those
            for fut in futures:
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for fut, result in zip(futures, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0
