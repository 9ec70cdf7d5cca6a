"""One velocity semantics, two stores: the Rust in-memory `VelocityStore` (embedded mode, and
`cluster.velocity = "local"`) and the Redis script shared by the processes of a cluster
(gateway/shared/redis_velocity.py) give the same features for the same sequence of payments, with
timestamps on and around bucket and window edges, late events, and distinct sets past their 64 members.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator

import msgspec
import pytest
import redis
from cluster.conftest import run_services_up
from gateway._fastpath import VELOCITY_FEATURES, RiskEngine, velocity_features
from gateway.shared.redis_velocity import KEY_TTL_MS, VelocityEvent, apply_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

CURRENCIES = ("USD", "EUR", "JPY", "XXX")  # XXX: no USD rate, so 0 cents
# Steps between payments: within a bucket, on and around the 2 s / 60 s / 30 min bucket edges and the
# 1 m / 1 h / 24 h window edges, backwards (late events) and past every window.
STEPS_MS = (0, 1, 999, 1_999, 2_000, 2_001, 58_000, 59_999, 60_000, 60_001, 1_799_999, 1_800_000,
            3_540_000, 3_599_999, 3_600_000, 84_600_000, 86_399_999, 86_400_000, 90_000_000,
            -1, -2_000, -60_000)


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(run_services_up()["REDIS_URL"])
    yield c
    c.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    p = f"vc{uuid.uuid4().hex[:10]}"
    yield p
    drop(client, p)


def drop(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])


def same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def compare(client: redis.Redis, prefix: str, requests: list[tuple[dict[str, object], int]]) -> None:
    """Feeds every (request, now_ms) to both stores; the features after each one must be identical."""
    local = RiskEngine()
    for n, (req, now_ms) in enumerate(requests):
        text = msgspec.json.encode(req).decode()
        expected = local.observe_velocity_json(text, now_ms)
        event = VelocityEvent.from_fastpath(local.velocity_event_json(text))
        got = velocity_features(apply_sync(client, prefix, event, now_ms))
        assert len(got) == VELOCITY_FEATURES
        if not same(expected, got):
            diff = [(i, x, y) for i, (x, y) in enumerate(zip(expected, got, strict=True))
                    if not same([x], [y])]
            pytest.fail(f"payment {n} at {now_ms} ({req}): (feature index, local, redis) {diff[:8]}")


def random_requests(rng: random.Random, count: int) -> list[tuple[dict[str, object], int]]:
    def pick(kind: str, pool: int, absent: float = 0.2) -> str | None:
        return None if rng.random() < absent else f"{kind}_{rng.randrange(pool)}"

    now = rng.choice((0, 1_999, 1_700_000_000_000, 1_700_000_001_999))
    out = []
    for _ in range(count):
        now = max(0, now + rng.choice(STEPS_MS))
        req: dict[str, object] = {
            "merchant_id": f"acct_{rng.randrange(2)}",
            "amount": rng.choice((0, 1, 999, 1250, 10**6, 99_999_999)),
            "currency": rng.choice(CURRENCIES),
            "card": pick("tok", 6, 0.05),
            "email": pick("e", 3),
            "ip": pick("10.0.0.", 3),
            "device_id": pick("dev", 3),
            "customer_id": pick("cus", 3),
        }
        out.append(({k: v for k, v in req.items() if v is not None}, now))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_give_identical_features(client: redis.Redis, prefix: str, seed: int) -> None:
    compare(client, prefix, random_requests(random.Random(seed), 400))


def test_distinct_sets_saturate_at_64_most_recent_members_alike(client: redis.Redis, prefix: str) -> None:
    rng = random.Random(7)
    requests = []
    now = 1_700_000_000_000
    # 150 cards on one device and one e-mail, some seen again, some at the same millisecond, some late.
    for i in range(400):
        now += rng.choice((0, 1, 500, 2_000, 30_000, -1_000))
        card = f"tok_{rng.randrange(150)}" if i % 3 else f"tok_{i}"
        requests.append(({"merchant_id": "acct", "amount": 100, "currency": "USD", "card": card,
                          "device_id": "dev_1", "email": f"e{i % 90}@example.com"}, now))
    compare(client, prefix, requests)
    owner = requests[0][0]
    text = msgspec.json.encode(owner).decode()
    event = VelocityEvent.from_fastpath(RiskEngine().velocity_event_json(text))
    got = velocity_features(apply_sync(client, prefix, event, now))
    assert got[38] == 64.0, "cards_per_device_24h saturates at 64"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(STEPS_MS), st.integers(0, 3), st.integers(0, 2),
                                st.integers(0, 5_000)), min_size=1, max_size=60))
def test_generated_sequences_give_identical_features(client: redis.Redis, steps: list[tuple[int, int, int, int]]
                                                     ) -> None:
    prefix = f"vh{uuid.uuid4().hex[:10]}"
    try:
        now = 1_700_000_000_000
        requests = []
        for step, card, device, amount in steps:
            now += step
            requests.append(({"merchant_id": "acct", "amount": amount, "currency": "EUR", "card": f"tok_{card}",
                              "device_id": f"dev_{device}", "ip": "10.1.1.1"}, now))
        compare(client, prefix, requests)
    finally:
        drop(client, prefix)


def test_keys_hold_hashes_only_and_expire(client: redis.Redis, prefix: str) -> None:
    req = {"merchant_id": "acct_secret", "amount": 500, "currency": "USD", "card": "tok_visa_secret",
           "email": "alice@example.com", "ip": "203.0.113.9", "device_id": "dev_secret", "customer_id": "cus_secret"}
    event = VelocityEvent.from_fastpath(RiskEngine().velocity_event_json(msgspec.json.encode(req).decode()))
    apply_sync(client, prefix, event)  # Redis TIME
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    assert len(keys) == 6 + 6, "a hash per dimension and a set per distinct pair (device, e-mail, ip, customer: 1; card: 2)"
    secrets = [v.encode() for v in req.values() if isinstance(v, str)]
    for key in keys:
        stored = [key]
        if client.type(key) == b"hash":
            stored += [x for item in client.hgetall(key).items() for x in item]
        else:
            stored += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        assert not [s for s in secrets for x in stored if s in x]
        ttl = client.pttl(key)
        assert KEY_TTL_MS - 60_000 < ttl <= KEY_TTL_MS


def test_malformed_events_and_counters_are_refused() -> None:
    with pytest.raises(ValueError, match="16 hex digits"):
        VelocityEvent.from_fastpath((1, ["tok_visa", None, None, None, None, None]))
    with pytest.raises(ValueError, match="6 keys"):
        VelocityEvent.from_fastpath((1, [None]))
    with pytest.raises(ValueError, match="cents"):
        VelocityEvent.from_fastpath((-1, [None] * 6))
    with pytest.raises(ValueError, match="exactly 54"):
        velocity_features([0] * 3)
    with pytest.raises(ValueError, match="outside"):
        velocity_features([-2] * VELOCITY_FEATURES)
