"""Velocity counters in cluster mode against the real services: with `cluster.velocity = "shared"` the
payments of one card spread over two gateway processes (behind one port) add up in Redis, so a velocity
rule declines past its threshold in total; with "local" each process counts only its own share."""

from __future__ import annotations

import httpx
import pytest
import redis
from support import auth, unique_token

from .test_cluster_mode import Cluster, cluster_factory  # noqa: F401 - the fixture, shared
from .test_cluster_risk import ADMIN_KEY, admin, decline_codes, metric_by_slot, rules_version_by_slot

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

THRESHOLD = 3
PAYMENTS = 14
RULE = f"card_velocity: block if :card_count_1h: > {THRESHOLD}\n"


def start(cl: Cluster, velocity: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Starts both processes with `cluster.velocity = velocity` and the velocity rule live in both."""
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
    assert cl.gateway.config_path is not None
    cl.gateway.config_path.write_text(cl.config_text + f'velocity = "{velocity}"\n')  # [cluster] is last
    cl.start_gateway()
    r = admin(cl, "POST", "/v1/admin/rules", {"source": RULE, "author": "tests"})
    assert r.status_code == 201, r.text
    rules_version_by_slot(cl, r.json()["version"])
    return r.json()["version"]


def pay_one_by_one(cl: Cluster, token: str, n: int = PAYMENTS) -> list[httpx.Response]:
    """`n` payments with one card, in sequence, each on a new connection (the kernel spreads them over
    both processes)."""
    out = []
    for _ in range(n):
        with httpx.Client(timeout=15) as c:
            out.append(c.post(f"{cl.gateway.url}/v1/payments", headers=auth(),
                              json={"amount": 1000, "currency": "USD", "payment_method": token,
                                    "customer": {"email": "velocity@example.com", "device_id": "dev_v1"}}))
    return out


def shared_events_by_slot(cl: Cluster, timeout_s: float = 20) -> dict[str, int]:
    """`gateway_velocity_shared_events_total` of each process, read from /metrics on new connections."""
    return metric_by_slot(cl, "gateway_velocity_shared_events_total", lambda seen: len(seen) >= 2,
                          "both slots", timeout_s)


def test_card_velocity_adds_up_over_both_processes_and_declines_past_the_threshold(
        cluster_factory, monkeypatch) -> None:  # noqa: F811
    cl = cluster_factory()
    start(cl, "shared", monkeypatch)
    token = unique_token("tok_v")
    responses = pay_one_by_one(cl, token)
    codes = decline_codes(responses)
    assert codes == [201] * THRESHOLD + ["velocity_exceeded"] * (PAYMENTS - THRESHOLD), codes
    trace = responses[0].json()["risk"]
    assert trace["action"] == "allow"
    assert responses[-1].json()["error"]["decline_code"] == "velocity_exceeded"

    # Both processes decided some of them, each with the counters of both.
    by_slot = shared_events_by_slot(cl)
    assert sum(by_slot.values()) == PAYMENTS and all(n > 0 for n in by_slot.values()), by_slot

    # Another card starts from zero: counters are per card, whichever process answers.
    assert decline_codes(pay_one_by_one(cl, unique_token("tok_w"), THRESHOLD)) == [201] * THRESHOLD

    # Redis holds hashes only, each key with an expiry.
    r = redis.Redis.from_url(cl.services.redis_url)
    try:
        keys = [k.decode() for k in r.scan_iter(f"{cl.prefix}:vel:*", count=1000)]
        assert any(k.startswith(f"{cl.prefix}:vel:card:") for k in keys), keys
        assert not [k for k in keys if token in k or "velocity@example.com" in k or "dev_v1" in k]
        assert all(0 < r.pttl(k) <= 25 * 3_600_000 for k in keys)
    finally:
        r.close()


def test_with_local_velocity_each_process_counts_only_its_own_share(cluster_factory, monkeypatch) -> None:  # noqa: F811
    cl = cluster_factory()
    start(cl, "local", monkeypatch)
    token = unique_token("tok_l")
    codes = decline_codes(pay_one_by_one(cl, token))
    # Each process allows THRESHOLD payments of the card, so the cluster lets more through in total.
    assert codes.count(201) > THRESHOLD, codes
    assert codes.count(201) <= 2 * THRESHOLD, codes
    assert set(shared_events_by_slot(cl).values()) == {0}
    r = redis.Redis.from_url(cl.services.redis_url)
    try:
        assert list(r.scan_iter(f"{cl.prefix}:vel:*", count=1000)) == []
    finally:
        r.close()


def test_velocity_setting_is_validated_and_defaults_to_shared() -> None:
    from gateway import config

    assert config.parse("[server]\nmode = 'cluster'\n").cluster.velocity == "shared"
    assert config.parse("[cluster]\nvelocity = 'local'\n").cluster.velocity == "local"
    with pytest.raises(config.ConfigurationError, match=r"x.toml: cluster.velocity: Invalid enum value 'global'"):
        config.parse("[cluster]\nvelocity = 'global'\n", "x.toml")


def test_unreachable_redis_refuses_the_admission_with_its_velocity_event() -> None:
    import asyncio
    import socket

    from gateway.shared.redis_state import RedisSharedState, SharedStateUnavailable
    from gateway.shared.redis_velocity import VelocityEvent

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    event = VelocityEvent(1000, ("0" * 16, None, None, None, None, "f" * 16))

    async def admit() -> None:
        state = RedisSharedState(f"redis://127.0.0.1:{port}/0", "tdown", 2, 200, 3600, 60)
        try:
            await state.admit("acct", "k1", "fp", 10.0, 10.0, 5_000, velocity=event)
        finally:
            await state.close()

    with pytest.raises(SharedStateUnavailable):
        asyncio.run(admit())
