"""A payment the risk engine challenges (`requires_action`) on the native API, against a real gateway:
capture, void and refund answer 422 with a stable code (never 500), and the worker neither fails on it
nor logs an exception for it on its scans."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import Gateway, auth, unique_token

ADMIN_KEY = "ak_test_" + "c" * 24
# Scans every 50 ms: a few dozen of them run while the test waits for the other payment below.
ENV = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_RECONCILE_INTERVAL_MS": "50"}
CHALLENGED_AMOUNT = 7777


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("challenge") / "data", extra_env=ENV).start()
    r = httpx.post(f"{g.url}/v1/admin/rules", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30,
                   json={"source": f"sca: challenge if :amount: = {CHALLENGED_AMOUNT}\n", "author": "tests"})
    assert r.status_code == 201, r.text
    yield g
    g.stop()


def pay(g: Gateway, amount: int, **headers: str) -> dict[str, Any]:
    r = httpx.post(f"{g.url}/v1/payments", headers={**auth(), **headers}, timeout=10,
                   json={"amount": amount, "currency": "USD", "payment_method": unique_token("tok_ch")})
    assert r.status_code == 201, r.text
    return dict(r.json())


def metric(g: Gateway, name: str) -> float:
    text = httpx.get(f"{g.url}/metrics", timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_capture_void_refund_of_a_challenged_payment_are_422_with_a_code(gw: Gateway) -> None:
    p = pay(gw, CHALLENGED_AMOUNT)
    assert p["status"] == "requires_action" and p["next_action"] == {"type": "three_d_secure"}
    for op, body in (("capture", {}), ("capture", {"amount": 100}), ("void", {}), ("refunds", {})):
        r = httpx.post(f"{gw.url}/v1/payments/{p['id']}/{op}", headers=auth(), json=body, timeout=10)
        assert r.status_code == 422, (op, r.text)
        assert r.json()["error"]["code"] == "payment_requires_action", (op, r.text)
    # The payment is unchanged and still readable.
    got = httpx.get(f"{gw.url}/v1/payments/{p['id']}", headers=auth(), timeout=10).json()
    assert got["status"] == "requires_action"


def test_a_challenged_payment_refusal_is_replayed_with_its_key(gw: Gateway) -> None:
    p = pay(gw, CHALLENGED_AMOUNT)
    key = {"Idempotency-Key": unique_token("cap")}
    first = httpx.post(f"{gw.url}/v1/payments/{p['id']}/capture", headers={**auth(), **key}, json={}, timeout=10)
    again = httpx.post(f"{gw.url}/v1/payments/{p['id']}/capture", headers={**auth(), **key}, json={}, timeout=10)
    assert first.status_code == again.status_code == 422
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()


def test_worker_does_not_fail_on_a_challenged_payment(gw: Gateway) -> None:
    errors_before = metric(gw, "gateway_worker_errors_total")
    challenged = pay(gw, CHALLENGED_AMOUNT)
    # A payment accepted after the challenged one, settled by the same worker: by then the worker has
    # taken the challenged one from the feed too, and its scans have run many times.
    other = pay(gw, 1000)
    r = httpx.get(f"{gw.url}/v1/payments/{other['id']}", headers={**auth(), "Prefer": "wait=5000"}, timeout=10)
    assert r.json()["status"] == "captured", r.text
    assert httpx.get(f"{gw.url}/v1/payments/{challenged['id']}", headers=auth(), timeout=10).json()[
        "status"] == "requires_action"
    assert metric(gw, "gateway_worker_errors_total") == errors_before
    log = gw.log()
    assert "is not a valid PaymentStatus" not in log
    assert "Traceback" not in log
