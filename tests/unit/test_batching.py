"""The worker's group commit (processing/batching.py): what concurrent submitters share, and what not."""

from __future__ import annotations

import asyncio

import pytest
from gateway.processing.batching import Batcher


def test_submissions_of_one_event_loop_round_go_out_as_one_batch_in_order() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * 10 for i in items]

    async def go() -> list[int]:
        b: Batcher[int, int] = Batcher(run, batch_max=100)
        return await asyncio.gather(*(b.submit(i) for i in range(7)))

    assert asyncio.run(go()) == [0, 10, 20, 30, 40, 50, 60]
    assert calls == [[0, 1, 2, 3, 4, 5, 6]]


def test_a_batch_never_holds_more_than_batch_max() -> None:
    sizes: list[int] = []

    async def run(items: list[int]) -> list[None]:
        sizes.append(len(items))
        return [None] * len(items)

    async def go() -> None:
        b: Batcher[int, None] = Batcher(run, batch_max=3)
        await asyncio.gather(*(b.submit(i) for i in range(10)))
        assert (b.batches, b.items) == (4, 10)

    asyncio.run(go())
    assert sizes == [3, 3, 3, 1]


def test_a_failed_batch_fails_its_own_submitters_only() -> None:
    async def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("store down")
        return items

    async def go() -> tuple[list[object], list[int]]:
        b: Batcher[int, int] = Batcher(run, batch_max=2)
        first = await asyncio.gather(*(b.submit(i) for i in (12, 13)), return_exceptions=True)
        second = await asyncio.gather(*(b.submit(i) for i in (14, 15)))
        return first, second

    first, second = asyncio.run(go())
    assert all(isinstance(e, RuntimeError) for e in first)
    assert second == [14, 15]


def test_a_submitter_resumes_only_after_its_batch_is_done() -> None:
    done: list[int] = []

    async def run(items: list[int]) -> list[None]:
        await asyncio.sleep(0.01)  # a transaction that takes time
        done.extend(items)
        return [None] * len(items)

    async def go() -> None:
        b: Batcher[int, None] = Batcher(run, batch_max=10)

        async def one(i: int) -> None:
            await b.submit(i)
            assert i in done  # the intent is committed before the PSP call that follows it

        await asyncio.gather(*(one(i) for i in range(5)))

    asyncio.run(go())


def test_linger_waits_for_later_submissions_to_join() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[None]:
        calls.append(items)
        return [None] * len(items)

    async def go() -> None:
        b: Batcher[int, None] = Batcher(run, batch_max=10, linger_s=0.05)

        async def late(i: int) -> None:
            await asyncio.sleep(0.01)
            await b.submit(i)

        await asyncio.gather(b.submit(0), late(1), late(2))

    asyncio.run(go())
    assert calls == [[0, 1, 2]]


def test_batch_max_out_of_range_is_refused() -> None:
    async def run(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="batch_max"):
        Batcher(run, batch_max=0)
