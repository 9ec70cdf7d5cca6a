"""Payment processing over HTTP against a real gateway process with the in-process PSP simulator.

Every scenario ends with `gateway ledger check` passing and the audit log telling the whole story.
The simulator runs 100x faster than real PSPs (`GATEWAY_PSP_TIME_SCALE=0.01`) and routes between
psp_a and psp_b only, so that psp_c's spontaneous errors and timeouts do not make stories random.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import Gateway, auth, create_merchant, run_cli

FAST_ENV = {
    "GATEWAY_PSP_TIME_SCALE": "0.01",
    "GATEWAY_PSPS": "psp_a,psp_b",
    "GATEWAY_RECONCILE_INTERVAL_MS": "100",
}
WAIT = {"Prefer": "wait=5000"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("proc") / "data", extra_env=FAST_ENV).start()
    yield g
    g.stop()


def create(g: Gateway, token: str = "tok_visa", capture: bool = False, amount: int = 1000,
           api_key: str | None = None) -> str:
    headers = auth(api_key) if api_key else auth()
    r = httpx.post(f"{g.url}/v1/payments", headers=headers, timeout=10,
                   json={"amount": amount, "currency": "USD", "payment_method": token, "capture": capture})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def get(g: Gateway, pid: str, wait_ms: int = 5000) -> dict:
    r = httpx.get(f"{g.url}/v1/payments/{pid}", headers={**auth(), "Prefer": f"wait={wait_ms}"}, timeout=15)
    assert r.status_code == 200, r.text
    return dict(r.json())


def op(g: Gateway, pid: str, kind: str, body: dict | None = None, key: str | None = None,
       wait: bool = True) -> httpx.Response:
    headers = {**auth(), **(WAIT if wait else {})}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{g.url}/v1/payments/{pid}/{kind}", headers=headers, json=body or {}, timeout=15)


def db(g: Gateway) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{g.data_dir / 'gateway.db'}?mode=ro", uri=True, timeout=10)


def story(g: Gateway, pid: str) -> list[str]:
    """The payment's statuses in order, from the audit log."""
    with db(g) as conn:
        rows = conn.execute(
            "SELECT old_status, new_status FROM audit_log WHERE payment_id = ? ORDER BY id", (pid,)
        ).fetchall()
    assert rows, f"no audit rows for {pid}"
    assert all(rows[i][1] == rows[i + 1][0] for i in range(len(rows) - 1)), rows
    return [rows[0][0], *(r[1] for r in rows)]


def attempts(g: Gateway, pid: str) -> list[tuple[str, str, str, str, str | None]]:
    with db(g) as conn:
        return conn.execute(
            "SELECT operation, psp, idempotency_key, status, code FROM payment_attempts WHERE payment_id = ?"
            " ORDER BY started_at_ms, attempt_id",
            (pid,),
        ).fetchall()


def assert_ledger_ok(g: Gateway) -> None:
    proc = run_cli("ledger", "check", "--data-dir", str(g.data_dir), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 violations" in proc.stdout


def code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


def authorized_payment(g: Gateway, token: str = "tok_visa") -> str:
    """Creates a payment with `token` (no capture) and checks that it is authorized; its id."""
    pid = create(g, token)
    assert get(g, pid)["status"] == "authorized"
    return pid


def failed_payment(g: Gateway, token: str, failure_code: str) -> tuple[str, list[tuple[str, str, str, str, str | None]]]:
    """Creates a payment with `token` and checks that it failed with `failure_code`, straight from
    processing; its id and its PSP attempts."""
    pid = create(g, token)
    p = get(g, pid)
    assert (p["status"], p["failure_code"]) == ("failed", failure_code)
    assert story(g, pid) == ["processing", "failed"]
    return pid, attempts(g, pid)


# -- scenarios -------------------------------------------------------------------------------------


def test_authorize_partial_capture_then_multiple_partial_refunds(gw: Gateway) -> None:
    pid = create(gw, capture=False)
    p = get(gw, pid)
    assert p["status"] == "authorized" and p["amount_capturable"] == 1000 and p["amount_captured"] == 0
    r = op(gw, pid, "capture", {"amount": 600})
    assert r.status_code == 200, r.text
    p = r.json()
    assert (p["status"], p["amount_captured"], p["amount_capturable"]) == ("captured", 600, 400)
    for amount, status in ((100, "partially_refunded"), (200, "partially_refunded"), (300, "refunded")):
        r = op(gw, pid, "refunds", {"amount": amount, "reason": "requested_by_customer"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == status
    p = get(gw, pid)
    assert (p["amount_captured"], p["amount_refunded"], p["amount_capturable"]) == (600, 600, 0)
    assert [(x["amount"], x["status"]) for x in p["refunds"]] == [(100, "succeeded"), (200, "succeeded"),
                                                                  (300, "succeeded")]
    assert [a["operation"] for a in p["attempts"]] == ["authorize", "capture", "refund", "refund", "refund"]
    assert code(op(gw, pid, "refunds", {"amount": 1})) == "payment_already_refunded"
    assert story(gw, pid) == ["processing", "authorized", "captured", "partially_refunded",
                              "partially_refunded", "refunded"]
    assert_ledger_ok(gw)


def test_auto_capture_captures_the_full_amount(gw: Gateway) -> None:
    pid = create(gw, capture=True, amount=2500)
    p = get(gw, pid)
    assert (p["status"], p["amount_captured"], p["amount_capturable"]) == ("captured", 2500, 0)
    assert story(gw, pid) == ["processing", "authorized", "captured"]
    assert_ledger_ok(gw)


def test_void_cancels_and_releases_the_hold(gw: Gateway) -> None:
    pid = authorized_payment(gw)
    r = op(gw, pid, "void")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["amount_capturable"]) == ("canceled", 0)
    assert code(op(gw, pid, "capture")) == "payment_already_canceled"
    assert code(op(gw, pid, "refunds", {"amount": 1})) == "payment_already_canceled"
    assert story(gw, pid) == ["processing", "authorized", "canceled"]
    assert_ledger_ok(gw)


def test_hard_decline_fails_without_retry(gw: Gateway) -> None:
    _, rows = failed_payment(gw, "tok_decline_stolen", "stolen_card")
    assert [(a[0], a[3]) for a in rows] == [("authorize", "hard_decline")]
    assert_ledger_ok(gw)


def test_soft_decline_is_retried_once_on_the_same_psp(gw: Gateway) -> None:
    pid, rows = failed_payment(gw, "tok_decline_insufficient_funds", "insufficient_funds")
    assert [a[3] for a in rows] == ["soft_decline", "soft_decline"]
    assert rows[0][1] == rows[1][1], "a soft decline is retried on the same PSP"
    assert [a[2] for a in rows] == [f"{pid}:auth:1", f"{pid}:auth:2"]


def test_the_worker_takes_psp_and_retry_settings_from_the_config_file(tmp_path: Path) -> None:
    # No GATEWAY_* variables: only the file passed to `gateway serve --config` reaches the worker child.
    config_text = ("[psp]\npsps = [\"psp_b\"]\ntime_scale = 0.01\n[worker]\nreconcile_interval_ms = 100\n"
                   "[router.retry]\nsoft_decline_retries_max = 0\n")
    g = Gateway(tmp_path / "data", config_text).start()
    try:
        pid = create(g, "tok_decline_insufficient_funds")
        p = get(g, pid)
        assert (p["status"], p["failure_code"]) == ("failed", "insufficient_funds")
        assert [(a[1], a[3]) for a in attempts(g, pid)] == [("psp_b", "soft_decline")], "no retry, psp_b only"
    finally:
        g.stop()


def test_timeout_goes_to_pending_verification_and_the_reconciler_resolves_it(gw: Gateway) -> None:
    pid = create(gw, "tok_timeout")
    p = get(gw, pid, wait_ms=8000)
    assert p["status"] == "authorized", p
    assert story(gw, pid) == ["processing", "pending_verification", "authorized"]
    rows = attempts(gw, pid)
    assert len(rows) == 1 and rows[0][3] == "approved", "resolved by status query on the same attempt"
    assert_ledger_ok(gw)


def test_psp_outage_fails_over_to_another_psp(gw: Gateway) -> None:
    pid = create(gw, "tok_psp_error_once", capture=True)
    p = get(gw, pid)
    assert p["status"] == "captured", p
    auths = [a for a in attempts(gw, pid) if a[0] == "authorize"]
    assert [a[3] for a in auths][-1] == "approved"
    assert {a[1] for a in auths if a[3] == "error"} == {"psp_a", "psp_b"}, "failed over to the other PSP"
    assert len({a[2] for a in auths}) == len(auths), "every attempt has its own PSP idempotency key"
    assert story(gw, pid) == ["processing", "authorized", "captured"]
    assert_ledger_ok(gw)


def test_psp_errors_everywhere_fail_the_payment_after_bounded_attempts(gw: Gateway) -> None:
    _, auths = failed_payment(gw, "tok_psp_error", "processor_unavailable")
    assert 2 <= len(auths) <= 4 and {a[1] for a in auths} == {"psp_a", "psp_b"}


def test_invalid_transitions_are_422_with_stable_codes(gw: Gateway) -> None:
    declined = create(gw, "tok_decline_lost")
    assert get(gw, declined)["status"] == "failed"
    assert code(op(gw, declined, "capture")) == "payment_not_capturable"
    assert code(op(gw, declined, "void")) == "payment_not_voidable"
    pid = authorized_payment(gw)
    r = op(gw, pid, "capture", {"amount": 1001})
    assert (r.status_code, code(r), r.json()["error"]["param"]) == (422, "amount_exceeds_capturable", "amount")
    assert code(op(gw, pid, "refunds", {"amount": 10})) == "payment_not_refundable"
    assert op(gw, pid, "capture", {"amount": 400}).status_code == 200
    assert code(op(gw, pid, "void")) == "payment_not_voidable"
    assert code(op(gw, pid, "refunds", {"amount": 401})) == "refund_exceeds_captured"
    assert op(gw, pid, "capture", {"amount": 100, "final_capture": True}).status_code == 200
    assert code(op(gw, pid, "capture", {"amount": 1})) == "payment_not_capturable"
    assert story(gw, pid) == ["processing", "authorized", "captured", "captured"]
    assert_ledger_ok(gw)


def test_idempotent_capture_and_refund_replay_the_stored_response(gw: Gateway) -> None:
    pid = authorized_payment(gw)
    key = str(uuid.uuid4())
    first = op(gw, pid, "capture", {"amount": 700}, key=key)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    again = op(gw, pid, "capture", {"amount": 700}, key=key)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    other = op(gw, pid, "capture", {"amount": 10}, key=key)
    assert (other.status_code, other.json()["error"]["type"]) == (400, "idempotency_error")
    rkey = str(uuid.uuid4())
    refund = op(gw, pid, "refunds", {"amount": 50}, key=rkey)
    assert refund.status_code == 200
    replay = op(gw, pid, "refunds", {"amount": 50}, key=rkey)
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == refund.content
    p = get(gw, pid)
    assert (p["amount_captured"], p["amount_refunded"], len(p["refunds"])) == (700, 50, 1)
    assert [a[0] for a in attempts(gw, pid)] == ["authorize", "capture", "refund"], "one PSP call each"
    assert_ledger_ok(gw)


def test_an_operation_refused_as_invalid_is_replayed_too(gw: Gateway) -> None:
    pid = authorized_payment(gw)
    key = str(uuid.uuid4())
    first = op(gw, pid, "refunds", {"amount": 5}, key=key)
    assert (first.status_code, code(first)) == (422, "payment_not_refundable")
    assert op(gw, pid, "refunds", {"amount": 5}, key=key).headers["idempotent-replayed"] == "true"


def test_without_prefer_wait_an_operation_is_accepted_with_202(gw: Gateway) -> None:
    pid = authorized_payment(gw, "tok_timeout_capture")
    r = op(gw, pid, "capture", wait=False)
    assert r.status_code == 202
    assert r.json()["pending_operation"]["type"] == "capture"
    busy = op(gw, pid, "void", wait=False)
    assert (busy.status_code, code(busy)) == (409, "payment_operation_in_progress")
    # The capture's response is lost at the PSP; the reconciler replays its key and finds it done.
    p = get(gw, pid, wait_ms=8000)
    assert (p["status"], p["amount_captured"], p["pending_operation"]) == ("captured", 1000, None)
    caps = [a for a in attempts(gw, pid) if a[0] == "capture"]
    assert {a[2] for a in caps} == {f"{pid}:capture:1"}, "the replay used the same PSP key"
    assert story(gw, pid) == ["processing", "authorized", "captured"]
    assert_ledger_ok(gw)


def test_operation_bodies_are_validated_precisely(gw: Gateway) -> None:
    pid = create(gw)
    r = op(gw, pid, "capture", {"amount": 10, "currency": "USD"})
    assert (r.status_code, code(r), r.json()["error"]["param"]) == (400, "parameter_unknown", "currency")
    r = op(gw, pid, "capture", {"amount": "10"})
    assert (r.status_code, code(r), r.json()["error"]["param"]) == (400, "parameter_invalid_integer", "amount")
    r = op(gw, pid, "refunds", {"amount": 0})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "amount")
    r = op(gw, pid, "capture", {"final_capture": "yes"})
    assert (r.status_code, code(r), r.json()["error"]["param"]) == (400, "parameter_invalid_type", "final_capture")
    r = op(gw, pid, "refunds", {"amount": 5, "reason": "card 4242 4242 4242 4242"})
    assert (r.status_code, code(r)) == (400, "card_number_not_allowed")
    assert "4242" not in r.text
    r = op(gw, pid, "refunds", {"reason": "x" * 5000})
    assert r.status_code == 413
    r = httpx.post(f"{gw.url}/v1/payments/{pid}/capture", headers=auth(), content=b"[1", timeout=10)
    assert (r.status_code, code(r)) == (400, "invalid_json")
    assert op(gw, "pay_" + "0" * 24, "capture").status_code == 404


def test_list_is_newest_first_with_cursor_pagination(gw: Gateway) -> None:
    m = create_merchant(gw.data_dir, "List Shop")
    ids = [create(gw, api_key=m["api_key"], amount=100 + i) for i in range(5)]
    deadline = time.monotonic() + 10
    url = f"{gw.url}/v1/payments"
    while True:
        page = httpx.get(url, params={"limit": 100}, headers=auth(m["api_key"]), timeout=10).json()
        if len(page["data"]) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [p["id"] for p in page["data"]] == ids[::-1] and page["has_more"] is False
    first = httpx.get(url, params={"limit": 2}, headers=auth(m["api_key"]), timeout=10).json()
    assert [p["id"] for p in first["data"]] == [ids[4], ids[3]] and first["has_more"] is True
    second = httpx.get(url, params={"limit": 2, "starting_after": ids[3]}, headers=auth(m["api_key"]),
                       timeout=10).json()
    assert [p["id"] for p in second["data"]] == [ids[2], ids[1]] and second["has_more"] is True
    default = httpx.get(url, headers=auth(m["api_key"]), timeout=10).json()
    assert len(default["data"]) == 5 and default["object"] == "list"
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "ten"}, "limit"),
                          ({"starting_after": "nope"}, "starting_after"),
                          ({"starting_after": "pay_" + "1" * 24}, "starting_after"), ({"sort": "asc"}, "sort")):
        r = httpx.get(url, params=params, headers=auth(m["api_key"]), timeout=10)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), (params, r.text)
    # Another merchant's payments never appear, even as a cursor.
    r = httpx.get(url, params={"starting_after": ids[0]}, headers=auth(), timeout=10)
    assert r.status_code == 400


# -- crash recovery --------------------------------------------------------------------------------


def test_sigkill_while_processing_recovers_every_payment_without_double_charges(tmp_path: Path) -> None:
    # Slower PSPs (about 1-3 ms per call x 20) so that the kill lands while calls are in flight.
    env = {"GATEWAY_PSP_TIME_SCALE": "0.1", "GATEWAY_PSPS": "psp_a,psp_b", "GATEWAY_RECONCILE_INTERVAL_MS": "100",
           "GATEWAY_WORKER_INFLIGHT_MAX": "8"}
    g = Gateway(tmp_path / "data", extra_env=env).start()
    tokens = ["tok_visa", "tok_mastercard", "tok_timeout", "tok_decline_stolen", "tok_psp_error_once"]
    ids: list[str] = []
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(60):
                r = client.post(f"{g.url}/v1/payments", headers=auth(), json={
                    "amount": 1000 + i, "currency": "EUR", "payment_method": tokens[i % len(tokens)],
                    "capture": i % 2 == 0})
                assert r.status_code == 201
                ids.append(r.json()["id"])
        with db(g) as conn:
            unfinished = conn.execute(
                "SELECT count(*) FROM payments WHERE status IN ('processing', 'pending_verification')").fetchone()[0]
        g.kill()
        assert unfinished > 0, "the kill must land while payments are being processed"
        g.start()
        deadline = time.monotonic() + 60
        settled = {"authorized", "captured", "failed", "canceled", "pending_verification", "refunded"}
        while True:
            with db(g) as conn:
                rows = dict(conn.execute("SELECT id, status FROM payments").fetchall())
                open_ops = conn.execute("SELECT count(*) FROM payment_operations WHERE status = 'pending'"
                                        ).fetchone()[0]
            if all(rows.get(pid) in settled for pid in ids) and open_ops == 0:
                break
            assert time.monotonic() < deadline, {pid: rows.get(pid) for pid in ids if rows.get(pid) not in settled}
            time.sleep(0.1)
        assert_ledger_ok(g)
        with db(g) as conn:
            auths = conn.execute(
                "SELECT payment_id, attempt_no, idempotency_key, status FROM payment_attempts"
                " WHERE operation = 'authorize'"
            ).fetchall()
            ops = conn.execute(
                "SELECT o.payment_id, o.psp_idempotency_key, a.idempotency_key, a.status, a.amount, o.amount"
                " FROM payment_operations o JOIN payment_attempts a ON a.operation_id = o.id"
            ).fetchall()
            state = {r[0]: r[1:] for r in conn.execute(
                "SELECT id, status, amount_captured FROM payments").fetchall()}
        for pid, attempt_no, key, _ in auths:
            assert key == f"{pid}:auth:{attempt_no}", "an attempt's PSP key is derived, never replaced"
        approved: dict[str, int] = {}
        for pid, *_rest, status in auths:
            approved[pid] = approved.get(pid, 0) + (status == "approved")
        assert max(approved.values()) == 1, "no payment was authorized twice"
        captured: dict[str, int] = {}
        for pid, op_key, attempt_key, status, amount, _ in ops:
            assert attempt_key == op_key, "every retry or replay of an operation reuses its PSP key"
            if status == "approved":
                captured[pid] = captured.get(pid, 0) + amount
        for pid, (status, amount_captured) in state.items():
            assert captured.get(pid, 0) == amount_captured, (pid, status)
        for pid in ids:
            s = story(g, pid) if state[pid][0] != "processing" else ["processing"]
            assert s[0] == "processing" and s[-1] == state[pid][0]
    finally:
        g.stop()
