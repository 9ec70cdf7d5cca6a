"""Signed webhooks in cluster mode: two `gateway worker` processes share the deliveries in PostgreSQL.

Each worker runs a dispatcher; deliveries are claimed with `FOR UPDATE SKIP LOCKED` and a lease, so
an event is sent by one worker at a time: with a healthy receiver every event arrives exactly once,
in order per payment, whichever worker wrote it. A worker SIGKILLed while events are pending leaves
them to the other one.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from e2e.test_webhooks import Receiver, assert_signed, delivered_types, receiver  # noqa: F401 - the fixture, shared
from support import auth

from .conftest import ServiceUrls
from .test_cluster_processing import ProcessingCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

WEBHOOK_ENV = {
    "GATEWAY_WEBHOOK_RETRY_BASE_MS": "100",
    "GATEWAY_WEBHOOK_RETRY_MAX_MS": "400",
    "GATEWAY_WEBHOOK_POLL_MS": "50",
    "GATEWAY_WEBHOOK_ATTEMPTS_MAX": "50",
    "GATEWAY_WEBHOOK_TIMEOUT_MS": "2000",
    "GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1",  # the receiver is on loopback
}


@pytest.fixture(scope="module")
def cl(services: ServiceUrls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessingCluster]:
    c = ProcessingCluster(services, tmp_path_factory.mktemp("cwebhooks"), psp_time_scale=0.01)
    c.gateway.extra_env = {"GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1"}
    c.worker_env.update(WEBHOOK_ENV)
    yield from c.serving()


@pytest.fixture(scope="module")
def secret(cl: ProcessingCluster, receiver: Receiver) -> str:  # noqa: F811
    r = httpx.post(f"{cl.gateway.url}/v1/webhook_endpoints", headers=auth(), json={"url": receiver.url}, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def test_every_event_is_sent_once_in_order_by_one_of_the_workers(
    cl: ProcessingCluster, receiver: Receiver, secret: str  # noqa: F811
) -> None:
    ids = [cl.create(capture=True) for _ in range(30)]
    for pid in ids:
        assert cl.get(pid)["status"] == "captured"
    for pid in ids:
        got = receiver.wait_for(pid, lambda g: len(g) >= 2)
        assert [(r.event["type"], r.status) for r in got] == [("payment.authorized", 200), ("payment.captured", 200)]
        assert_signed(got, secret)
    time.sleep(1)  # leave time for a second (wrong) send of anything
    sent = [r.event["id"] for pid in ids for r in receiver.for_payment(pid)]
    assert len(sent) == len(set(sent)) == 60
    rows = cl.query("SELECT status, attempts, count(*) FROM webhook_deliveries GROUP BY status, attempts")
    assert rows == [("delivered", 1, 60)]


def test_a_failing_receiver_is_retried_with_the_same_event_across_workers(
    cl: ProcessingCluster, receiver: Receiver, secret: str  # noqa: F811
) -> None:
    receiver.fail_first["payment.authorized"] = 3
    try:
        pid = cl.create(capture=True)
        assert cl.get(pid)["status"] == "captured"
        got = receiver.wait_for(pid, lambda g: len(delivered_types(g)) == 2)
    finally:
        receiver.fail_first.pop("payment.authorized")
    assert [(r.event["type"], r.status) for r in got] == [("payment.authorized", 500)] * 3 + [
        ("payment.authorized", 200), ("payment.captured", 200)]
    assert len({r.event["id"] for r in got[:4]}) == 1
    assert_signed(got, secret)


def test_events_pending_when_a_worker_is_sigkilled_are_delivered_by_the_other(
    cl: ProcessingCluster, receiver: Receiver, secret: str  # noqa: F811
) -> None:
    receiver.status_all = 503
    try:
        ids = [cl.create(capture=True) for _ in range(10)]
        for pid in ids:
            assert cl.get(pid)["status"] == "captured"
        for pid in ids:
            receiver.wait_for(pid, lambda g: len(g) >= 1)
        victim = cl.workers[0]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        receiver.status_all = None
    for pid in ids:
        got = receiver.wait_for(pid, lambda g: len(delivered_types(g)) == 2, timeout_s=60)
        assert delivered_types(got) == ["payment.authorized", "payment.captured"]
        assert_signed(got, secret)
    pending = cl.query("SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'")
    assert pending == [(0,)]
