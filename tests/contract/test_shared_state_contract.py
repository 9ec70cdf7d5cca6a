"""One behaviour, every backend: the `SharedState` contract that the Redis implementation (cluster
mode) and the in-memory fake (unit tests only) both honour."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from cluster.conftest import run_services_up
from gateway.shared.redis_state import InMemorySharedState, RedisSharedState, SharedState

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=[pytest.mark.cluster, pytest.mark.timeout(900)]),
]
LOCK_TTL_MS = 5_000


@pytest.fixture(scope="module")
def redis_url() -> str:
    return run_services_up()["REDIS_URL"]


@pytest.fixture(params=BACKENDS)
def make_state(request: pytest.FixtureRequest) -> Iterator[object]:
    made: list[RedisSharedState] = []

    def make() -> SharedState:
        if request.param == "memory":
            return InMemorySharedState()
        state = RedisSharedState(request.getfixturevalue("redis_url"), f"c{uuid.uuid4().hex[:10]}", 8, 500,
                                 3600, 60)
        made.append(state)
        return state

    yield make


def run(coro):
    return asyncio.run(coro)


def test_second_request_with_a_key_in_flight_is_told_so(make_state) -> None:
    async def go() -> list[str]:
        s = make_state()
        first = await s.admit("acct_a", "k1", "fp", 100.0, 100.0, LOCK_TTL_MS)
        second = await s.admit("acct_a", "k1", "fp", 100.0, 100.0, LOCK_TTL_MS)
        other_merchant = await s.admit("acct_b", "k1", "fp", 100.0, 100.0, LOCK_TTL_MS)
        await s.close()
        return [first.kind, second.kind, other_merchant.kind]

    assert run(go()) == ["ok", "in_flight", "ok"]


def test_finished_response_is_replayed_for_same_parameters_and_refused_for_others(make_state) -> None:
    async def go() -> tuple[object, object, object]:
        s = make_state()
        await s.admit("acct_a", "k1", "fp1", 100.0, 100.0, LOCK_TTL_MS)
        await s.finish("acct_a", "k1", "fp1", 201, b'{"id":"pay_1"}', "pay_1", cache=True)
        same = await s.admit("acct_a", "k1", "fp1", 100.0, 100.0, LOCK_TTL_MS)
        other = await s.admit("acct_a", "k1", "fp2", 100.0, 100.0, LOCK_TTL_MS)
        recent = await s.recent_payment("pay_1")
        await s.close()
        return same, other, recent

    same, other, recent = run(go())
    assert (same.kind, same.status, same.body) == ("replay", 201, b'{"id":"pay_1"}')
    assert other.kind == "mismatch"
    assert recent == ("acct_a", b'{"id":"pay_1"}')


def test_uncached_finish_releases_the_lock_without_storing_a_response(make_state) -> None:
    async def go() -> str:
        s = make_state()
        await s.admit("acct_a", "k1", "fp", 100.0, 100.0, LOCK_TTL_MS)
        await s.finish("acct_a", "k1", "fp", 400, b"{}", None, cache=False)
        again = await s.admit("acct_a", "k1", "fp", 100.0, 100.0, LOCK_TTL_MS)
        await s.close()
        return again.kind

    assert run(go()) == "ok"


def test_shared_rate_limit_refuses_past_the_burst_with_a_retry_after(make_state) -> None:
    async def go() -> list[object]:
        s = make_state()
        out = [await s.admit("acct_r", None, "", 1.0, 3.0, LOCK_TTL_MS) for _ in range(4)]
        await s.close()
        return out

    out = run(go())
    assert [a.kind for a in out] == ["ok", "ok", "ok", "rate_limited"]
    assert out[3].retry_after_s >= 1
