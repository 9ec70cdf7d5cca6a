"""Signing and verification of webhook payloads, the retry schedule, endpoint URL checks, and the
outbox of the processing store (an event and its deliveries commit with the payment change)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import msgspec
import pytest
from gateway import config
from gateway.api.webhooks import check_url
from gateway.config import ConfigurationError
from gateway.domain.events import WebhookSettings, new_endpoint_secret
from gateway.domain.secrets import Secret
from gateway.domain.signature import WebhookSignatureError, compute_signature, sign, verify_signature
from gateway.store.processing import ProcessingStore
from gateway.store.sqlite import SqliteStore

SECRET = "whsec_test_0123456789abcdef"
BODY = b'{"id":"evt_1","type":"payment.captured","data":{"object":{"id":"pay_1","amount":1000}}}'


def test_a_signed_payload_verifies_and_returns_its_timestamp() -> None:
    header = sign(BODY, SECRET, timestamp=1_700_000_000)
    assert header == f"t=1700000000,v1={compute_signature(BODY, SECRET, 1_700_000_000)}"
    assert verify_signature(BODY, header, SECRET, tolerance_s=300, now=1_700_000_100) == 1_700_000_000


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert compute_signature(BODY, SECRET, 1_700_000_000) == expected


def test_a_tampered_body_is_rejected() -> None:
    header = sign(BODY, SECRET)
    with pytest.raises(WebhookSignatureError, match="no signature matches"):
        verify_signature(BODY.replace(b"1000", b"9000"), header, SECRET)


def test_a_wrong_secret_is_rejected() -> None:
    header = sign(BODY, SECRET)
    with pytest.raises(WebhookSignatureError, match="no signature matches"):
        verify_signature(BODY, header, "whsec_another_secret_000000")


def test_a_stale_timestamp_is_rejected_even_with_a_valid_signature() -> None:
    old = int(time.time()) - 301
    header = sign(BODY, SECRET, timestamp=old)
    with pytest.raises(WebhookSignatureError, match="tolerance"):
        verify_signature(BODY, header, SECRET, tolerance_s=300)
    # A timestamp from the future is as suspicious as an old one.
    with pytest.raises(WebhookSignatureError, match="tolerance"):
        verify_signature(BODY, sign(BODY, SECRET, timestamp=int(time.time()) + 301), SECRET, tolerance_s=300)


def test_a_replayed_timestamp_cannot_be_swapped_for_a_fresh_one() -> None:
    header = sign(BODY, SECRET, timestamp=1_700_000_000)
    forged = header.replace("t=1700000000", f"t={int(time.time())}")
    with pytest.raises(WebhookSignatureError, match="no signature matches"):
        verify_signature(BODY, forged, SECRET)


@pytest.mark.parametrize("header", ["", "garbage", "t=abc,v1=00", "v1=00", "t=1700000000", "t=1,v1=" + "0" * 2000])
def test_malformed_headers_are_rejected_with_a_reason(header: str) -> None:
    with pytest.raises(WebhookSignatureError):
        verify_signature(BODY, header, SECRET, now=1_700_000_000)


def test_any_of_several_v1_signatures_may_match_for_secret_rotation() -> None:
    t = int(time.time())
    header = f"t={t},v1={compute_signature(BODY, 'whsec_old_secret_0000000', t)},v1={compute_signature(BODY, SECRET, t)}"
    assert verify_signature(BODY, header, SECRET) == t


def test_endpoint_secrets_are_masked_in_repr_and_str() -> None:
    secret = new_endpoint_secret()
    assert secret.expose().startswith("whsec_") and len(secret.expose()) > 40
    assert secret.expose() not in repr(secret) and secret.expose() not in f"{secret}"
    assert verify_signature(BODY, sign(BODY, secret), Secret(secret.expose())) > 0


def test_retry_delays_grow_exponentially_with_jitter_and_are_capped() -> None:
    s = WebhookSettings(retry_base_ms=1000, retry_max_ms=60_000)
    rng = random.Random(7)
    for attempts in range(1, 12):
        full = min(60_000, 1000 * 2 ** (attempts - 1))
        delays = {s.retry_delay_ms(attempts, rng) for _ in range(50)}
        assert all(full // 2 <= d <= full for d in delays), (attempts, delays)
        assert len(delays) > 1  # jittered, not one fixed value


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://shop.example.com/hooks", True),
        ("http://shop.example.com:8080/hooks?x=1", True),
        ("ftp://shop.example.com/hooks", False),
        ("https://user:pass@shop.example.com/", False),
        ("https:///nohost", False),
        ("https://shop.example.com/a b", False),
        ("https://shop.example.com/#frag", False),
        ("http://127.0.0.1:9000/hooks", False),
        ("http://10.1.2.3/hooks", False),
        ("http://169.254.169.254/latest/meta-data", False),
        ("http://localhost/hooks", False),
        ("http://[::1]/hooks", False),
    ],
)
def test_endpoint_urls_are_http_or_https_and_public_by_default(url: str, ok: bool) -> None:
    assert (check_url(url, allow_private=False) is None) is ok


def test_loopback_urls_are_accepted_when_allowed() -> None:
    assert check_url("http://127.0.0.1:9000/hooks", allow_private=True) is None


def test_settings_refuse_out_of_range_values() -> None:
    with pytest.raises(ConfigurationError, match="ATTEMPTS_MAX"):
        config.load(None, {"GATEWAY_WEBHOOK_ATTEMPTS_MAX": "0"})
    with pytest.raises(ConfigurationError, match="TIMEOUT_MS"):
        config.load(None, {"GATEWAY_WEBHOOK_TIMEOUT_MS": "999999"})


def _store(tmp_path: Path) -> tuple[SqliteStore, ProcessingStore]:
    store = SqliteStore(tmp_path / "gateway.db")
    store.migrate()
    store.create_merchant("Shop", "0" * 64, merchant_id="acct_shop")
    body = {"id": "pay_" + "0" * 24, "object": "payment", "status": "processing", "amount": 1000,
            "currency": "USD", "payment_method": "tok_visa", "capture": False, "created": 1}
    record = msgspec.json.encode({"type": "payment.created", "merchant_id": "acct_shop", "status_code": 201,
                                  "created_ms": 1, "payment": body})
    store.apply_wal_records([(1, record)])
    return store, ProcessingStore(store)


def test_the_outbox_writes_one_delivery_per_subscribed_endpoint_and_claims_each_once(tmp_path: Path) -> None:
    from gateway.domain import payment as sm
    from gateway.domain.attempt import ProcessingResult

    store, ps = _store(tmp_path)
    pid = "pay_" + "0" * 24
    all_events = ps.create_endpoint("acct_shop", "https://a.example/h", ["*"], None, SECRET)
    only_failed = ps.create_endpoint("acct_shop", "https://b.example/h", ["payment.failed"], None, SECRET)
    assert all_events is not None and only_failed is not None
    rec = ps.load(pid)
    assert rec is not None
    t = sm.authorize(rec.payment, amount=1000, psp="psp_a", psp_reference="ref_1", actor="worker", at_ms=1)
    ps.apply(ProcessingResult(payment=t.payment, outcome=None, transitions=[t]), base_version=rec.payment.version)
    claimed = ps.claim_deliveries(10, lease_ms=60_000)
    assert [d.endpoint_id for d in claimed] == [all_events["id"]]
    event = msgspec.json.decode(claimed[0].body)
    assert event["type"] == "payment.authorized" and event["data"]["object"]["status"] == "authorized"
    assert event["id"].startswith("evt_") and event["id"] == claimed[0].event_id
    assert ps.claim_deliveries(10, lease_ms=60_000) == []  # leased: no second dispatcher gets it
    ps.finish_delivery(claimed[0], "delivered", 200, None, None)
    found = ps.event("acct_shop", event["id"])
    assert found is not None and found[1][0]["status"] == "delivered" and found[1][0]["attempts"] == 1
    assert ps.event("acct_other", event["id"]) is None
    store.close()


def test_event_ids_of_a_payment_share_a_prefix_and_sort_in_the_order_of_their_events() -> None:
    from gateway.domain.events import event_id, event_id_prefix

    pid = "pay_" + "7" * 24
    ids = [event_id(pid, n) for n in (1, 2, 9, 10, 11, 100, 12345)]
    assert ids == sorted(ids) and all(i.startswith(event_id_prefix(pid)) for i in ids)
    assert event_id(pid, 1) != event_id(pid, 1)  # random tail: unique even if a payment's count restarts


def test_random_letters_are_uniform_letters_of_the_id_alphabet(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.domain import events

    for n in (0, 1, 8, 24, 32, 100):
        assert all(len(events.random_letters(n)) == n for _ in range(50))
    drawn = "".join(events.random_letters(24) for _ in range(5000))
    counts = {c: drawn.count(c) for c in set(drawn)}
    assert set(counts) == set("abcdefghjkmnpqrstvwxyz")
    expected = len(drawn) / 22
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts
    # A draw whose bytes are all of the uneven top (dropped) is topped up, not cut short.
    draws = iter([b"\xff" * 18, b"\x00\x01\xf2\x14\xf1\xfe" * 2])
    monkeypatch.setattr(events._secrets, "token_bytes", lambda k: next(draws))
    assert events.random_letters(8) == "abyzabyz"


@pytest.mark.parametrize(
    ("url", "private"),
    [("http://localhost:9000/h", True), ("http://127.0.0.1/h", True), ("http://[::1]:8080/h", True),
     ("http://10.0.0.7/h", True), ("http://169.254.169.254/h", True), ("http://93.184.216.34/h", False)],
)
def test_the_dispatcher_refuses_private_targets_unless_allowed(tmp_path: Path, url: str, private: bool) -> None:
    import asyncio

    from gateway.processing.webhooks import Dispatcher

    store, ps = _store(tmp_path)
    d = Dispatcher(ps, WebhookSettings())
    assert asyncio.run(d._private_target(url)) is private
    store.close()


def test_a_refused_operation_is_a_payment_operation_failed_event_in_the_same_transaction(tmp_path: Path) -> None:
    from gateway.domain import payment as sm
    from gateway.domain.attempt import ProcessingResult
    from gateway.store.processing import Accepted, OperationFinish

    store, ps = _store(tmp_path)
    pid = "pay_" + "0" * 24
    endpoint = ps.create_endpoint("acct_shop", "https://a.example/h", ["payment.operation_failed"], None, SECRET)
    assert endpoint is not None
    rec = ps.load(pid)
    assert rec is not None
    t = sm.authorize(rec.payment, amount=1000, psp="psp_a", psp_reference="ref_1", actor="worker", at_ms=1)
    ps.apply(ProcessingResult(payment=t.payment, outcome=None, transitions=[t]), base_version=rec.payment.version)
    accepted = ps.accept_operation("acct_shop", pid, "capture", None, False, None, None, "fp")
    assert isinstance(accepted, Accepted)
    ps.finish_operation(OperationFinish(accepted.operation.id, "failed", "do_not_honor"), pid)
    listed = [msgspec.json.decode(e) for e in ps.payment_events("acct_shop", pid, 10)]
    assert [e["type"] for e in listed] == ["payment.authorized", "payment.operation_failed"]
    assert listed[1]["data"]["object"]["status"] == "authorized"
    # Only the subscribed type has a delivery.
    claimed = ps.claim_deliveries(10, lease_ms=60_000)
    assert [(d.event_id, d.endpoint_id) for d in claimed] == [(listed[1]["id"], endpoint["id"])]
    store.close()
