"""The merchant API over HTTP against a real gateway process."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid

import httpx
import pytest
from support import DEMO_KEY, Gateway, auth, create_merchant, same_payment

BODY = {
    "amount": 1000,
    "currency": "USD",
    "payment_method": "tok_visa",
    "capture": True,
    "description": "Order 1",
    "metadata": {"order_id": "o-1"},
    "customer": {"email": "buyer@example.com", "ip": "203.0.113.7", "device_id": "dev-1", "country": "US"},
}


def post(g: Gateway, body: object, key: str | None = None, api_key: str = DEMO_KEY, **kw) -> httpx.Response:
    headers = auth(api_key)
    if key is not None:
        headers["Idempotency-Key"] = key
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{g.url}/v1/payments", content=body, headers=headers, timeout=10, **kw)
    return httpx.post(f"{g.url}/v1/payments", json=body, headers=headers, timeout=10, **kw)


def test_create_returns_processing_payment_and_get_reads_it_back_immediately(gateway: Gateway) -> None:
    r = post(gateway, BODY)
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["id"].startswith("pay_") and p["object"] == "payment" and p["status"] == "processing"
    assert (p["amount"], p["currency"], p["payment_method"], p["capture"]) == (1000, "USD", "tok_visa", True)
    assert p["metadata"] == {"order_id": "o-1"} and p["customer"]["country"] == "US"
    assert isinstance(p["created"], int)
    got = httpx.get(f"{gateway.url}/v1/payments/{p['id']}", headers=auth(), timeout=10)
    assert got.status_code == 200 and same_payment(got.json(), p)


def test_only_required_fields_are_required(gateway: Gateway) -> None:
    r = post(gateway, {"amount": 500, "currency": "jpy", "payment_method": "tok_visa"})
    assert r.status_code == 201
    assert r.json()["currency"] == "JPY" and r.json()["capture"] is True


def test_another_merchants_payment_is_not_found(gateway: Gateway) -> None:
    other = create_merchant(gateway.data_dir, "Other Shop")
    p = post(gateway, BODY).json()
    r = httpx.get(f"{gateway.url}/v1/payments/{p['id']}", headers=auth(other["api_key"]), timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "resource_missing"
    assert httpx.get(f"{gateway.url}/v1/payments/pay_doesnotexist", headers=auth(), timeout=10).status_code == 404


def test_replay_with_same_key_returns_stored_response(gateway: Gateway) -> None:
    key = str(uuid.uuid4())
    first = post(gateway, BODY, key)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = post(gateway, json.dumps(BODY, indent=2), key)  # same parameters, different bytes
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content


def test_same_key_with_different_body_is_an_idempotency_error(gateway: Gateway) -> None:
    key = str(uuid.uuid4())
    assert post(gateway, BODY, key).status_code == 201
    r = post(gateway, {**BODY, "amount": 1001}, key)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "idempotency_error"


def test_keys_are_scoped_per_merchant(gateway: Gateway) -> None:
    other = create_merchant(gateway.data_dir, "Scoped Shop")
    key = str(uuid.uuid4())
    a = post(gateway, BODY, key).json()
    b = post(gateway, {**BODY, "amount": 7}, key, api_key=other["api_key"])
    assert b.status_code == 201 and b.json()["id"] != a["id"]


def test_fifty_concurrent_requests_with_one_key_create_one_payment(gateway: Gateway) -> None:
    key = str(uuid.uuid4())

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=50)) as c:
            headers = {**auth(), "Idempotency-Key": key}
            return await asyncio.gather(
                *[c.post(f"{gateway.url}/v1/payments", json=BODY, headers=headers) for _ in range(50)]
            )

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 409}, statuses
    ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 1
    for r in responses:
        if r.status_code == 409:
            assert r.json()["error"]["type"] == "idempotency_error"
    # After the commit every retry is a replay of the one payment.
    assert post(gateway, BODY, key).json()["id"] in ids
    _wait_materialised(gateway, ids)
    with sqlite3.connect(gateway.data_dir / "gateway.db") as db:
        rows = db.execute("SELECT count(*) FROM payments WHERE idempotency_key = ?", (key,)).fetchone()[0]
    assert rows == 1


def _wait_materialised(g: Gateway, ids: set[str], timeout_s: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sqlite3.connect(g.data_dir / "gateway.db") as db:
            marks = ",".join("?" * len(ids))
            n = db.execute(f"SELECT count(*) FROM payments WHERE id IN ({marks})", tuple(ids)).fetchone()[0]
        if n == len(ids):
            return
        time.sleep(0.05)
    raise AssertionError("payments not materialised in time")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[]", "invalid_json", None),
        ({"currency": "USD", "payment_method": "tok_visa"}, "parameter_missing", "amount"),
        ({"amount": "10", "currency": "USD", "payment_method": "tok_visa"}, "parameter_invalid_integer", "amount"),
        ({"amount": 10.5, "currency": "USD", "payment_method": "tok_visa"}, "parameter_invalid_integer", "amount"),
        ({"amount": 0, "currency": "USD", "payment_method": "tok_visa"}, "amount_too_small", "amount"),
        ({"amount": -5, "currency": "USD", "payment_method": "tok_visa"}, "amount_too_small", "amount"),
        ({"amount": 100000000, "currency": "USD", "payment_method": "tok_visa"}, "amount_too_large", "amount"),
        ({"amount": 10, "currency": "ABC", "payment_method": "tok_visa"}, "invalid_currency", "currency"),
        ({"amount": 10, "currency": 840, "payment_method": "tok_visa"}, "parameter_invalid_type", "currency"),
        ({"amount": 10, "payment_method": "tok_visa"}, "parameter_missing", "currency"),
        ({"amount": 10, "currency": "USD"}, "parameter_missing", "payment_method"),
        ({"amount": 10, "currency": "USD", "payment_method": "card"}, "invalid_payment_method", "payment_method"),
        ({**BODY, "capture": "yes"}, "parameter_invalid_type", "capture"),
        ({**BODY, "surprise": 1}, "parameter_unknown", "surprise"),
        ({**BODY, "customer": {"emial": "x@y.z"}}, "parameter_unknown", "customer[emial]"),
        ({**BODY, "customer": {"email": "nope"}}, "email_invalid", "customer[email]"),
        ({**BODY, "customer": {"country": "USA"}}, "parameter_too_long", "customer[country]"),
        ({**BODY, "metadata": {f"k{i}": "v" for i in range(51)}}, "metadata_too_many_keys", "metadata"),
        ({**BODY, "metadata": {"k": "v" * 501}}, "metadata_value_too_long", "metadata[k]"),
        ({**BODY, "metadata": {"k" * 41: "v"}}, "metadata_key_invalid", "metadata"),
        ({**BODY, "metadata": {"k": {"nested": 1}}}, "parameter_invalid_type", "metadata[k]"),
        ({**BODY, "description": "d" * 1001}, "parameter_too_long", "description"),
    ],
)
def test_invalid_bodies_get_a_precise_error(gateway: Gateway, body: object, code: str, param: str | None) -> None:
    r = post(gateway, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", code, param)
    assert err["message"]


def test_body_over_the_size_limit_is_refused(gateway: Gateway) -> None:
    r = post(gateway, {**BODY, "description": "x" * 20_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_idempotency_key_over_the_limit_is_refused(gateway: Gateway) -> None:
    r = post(gateway, BODY, "k" * 256)
    assert r.status_code == 400 and r.json()["error"]["param"] == "Idempotency-Key"


PANS = ["4242424242424242", "5555 5555 5555 4444", "3782-822463-10005"]


@pytest.mark.parametrize("pan", PANS)
def test_card_numbers_are_refused_and_never_written_or_logged(gateway: Gateway, pan: str) -> None:
    for body in (
        {**BODY, "description": f"card {pan}"},
        {**BODY, "metadata": {"card": pan}},
        {**BODY, "customer": {"device_id": pan}},
    ):
        r = post(gateway, body, key=str(uuid.uuid4()))
        assert r.status_code == 400 and r.json()["error"]["code"] == "card_number_not_allowed"
        assert pan not in r.text and pan.replace(" ", "").replace("-", "") not in r.text
    digits = pan.replace(" ", "").replace("-", "").encode()
    for f in gateway.data_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert digits not in data and pan.encode() not in data, f
    assert pan not in gateway.log() and digits.decode() not in gateway.log()


def test_missing_or_bad_key_is_401(gateway: Gateway) -> None:
    r = httpx.post(f"{gateway.url}/v1/payments", json=BODY, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = post(gateway, BODY, api_key="sk_test_wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{gateway.url}/v1/payments/pay_x", headers=auth("sk_test_wrong"), timeout=10)
    assert r.status_code == 401


def test_rate_limit_answers_429_with_retry_after(gateway: Gateway) -> None:
    m = create_merchant(gateway.data_dir, "Slow Shop", "--rate-limit-per-s", "0.5", "--rate-limit-burst", "3")
    statuses = [post(gateway, BODY, api_key=m["api_key"]).status_code for _ in range(5)]
    assert statuses[:3] == [201, 201, 201] and statuses[3:] == [429, 429]
    r = post(gateway, BODY, api_key=m["api_key"])
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    # Another merchant is not affected.
    assert post(gateway, BODY).status_code == 201


def test_health_readiness_and_metrics(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200
    post(gateway, BODY)
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    assert 'gateway_http_requests_total{route="create_payment",status="201"}' in text
    for stage in ("validate", "idempotency", "rate_limit", "risk", "wal_append", "total"):
        assert f'gateway_fastpath_stage_seconds_count{{stage="{stage}"}}' in text
    count = [ln for ln in text.splitlines() if ln.startswith("gateway_wal_fsync_seconds_count")]
    assert count and int(count[0].split()[-1]) >= 1
    assert "gateway_wal_batch_records_bucket" in text
