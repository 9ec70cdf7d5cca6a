"""The embedded runtime tells its materialising child the committed LSN at most once per interval and
never loses the latest one (runtime/embedded.py: CommittedNotifier)."""

from __future__ import annotations

import asyncio

from gateway.runtime.embedded import CommittedNotifier


def test_commits_within_an_interval_reach_the_child_once_with_the_latest_lsn() -> None:
    async def run() -> list[int]:
        sent: list[int] = []
        notifier = CommittedNotifier(asyncio.get_running_loop(), sent.append, interval_s=0.05)
        notifier(1)  # the first commit after a quiet interval goes at once
        for lsn in range(2, 50):
            notifier(lsn)
        assert sent == [1]
        await asyncio.sleep(0.12)
        return sent

    assert asyncio.run(run()) == [1, 49]


def test_an_lsn_never_goes_backwards_and_flush_sends_the_latest_at_once() -> None:
    async def run() -> list[int]:
        sent: list[int] = []
        notifier = CommittedNotifier(asyncio.get_running_loop(), sent.append, interval_s=10.0)
        notifier(7)
        notifier(9)
        notifier(8)  # an older position reported late does not replace the newer one
        notifier.flush()  # before the child is stopped: no waiting for the interval
        await asyncio.sleep(0)
        return sent

    assert asyncio.run(run()) == [7, 9]
