"""The worker's batch step (processing/batch.py): new payments go through authorization and auto-capture
together, one transaction per stage of a batch, and whatever needs more than that leaves the batch for
the one-payment path with the same outcome that path would give."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from gateway.domain import payment as sm
from gateway.processing.authorize import AuthorizationRun
from gateway.processing.worker import Worker, WorkerSettings
from gateway.psp.bulkhead import Bulkhead
from gateway.psp.routing import PSPRoute, Router
from gateway.psp_sim import PSP_A, PSP_B, SimulatedPSP
from gateway.psp_sim.client import InProcessPSPClient
from gateway.store.sqlite import SqliteStore


def _accept(store: SqliteStore, payments: list[tuple[str, str]]) -> None:
    records = []
    for lsn, (pid, token) in enumerate(payments, 1):
        payment = {"id": pid, "object": "payment", "status": "processing", "amount": 1000 + lsn,
                   "currency": "USD", "payment_method": token, "capture": True, "created": 1}
        records.append((lsn, msgspec.json.encode({"type": "payment.created", "merchant_id": "acct_t",
                                                  "status_code": 201, "created_ms": 1, "payment": payment})))
    store.apply_wal_records(records)


def _run(tmp_path: Path, payments: list[tuple[str, str]], final: set[str],
         before_start: Callable[[Worker], None] | None = None, **settings: Any
         ) -> tuple[Worker, dict[str, str], list[tuple[str, str, str, int]], dict[str, int]]:
    db_path = tmp_path / "gateway.db"
    store = SqliteStore(db_path)
    store.migrate()
    store.create_merchant("T", "0" * 64, merchant_id="acct_t")
    _accept(store, payments)
    worker = Worker(store, WorkerSettings(psp_time_scale=0, **settings))
    calls = {"record_intents": 0, "apply_many": 0, "intents": 0}
    record_intents, apply_many = worker.pstore.record_intents, worker.pstore.apply_many

    def counting_intents(intents: Any) -> None:
        calls["record_intents"] += 1
        calls["intents"] += len(intents)
        record_intents(intents)

    def counting_applies(changes: Any) -> Any:
        calls["apply_many"] += 1
        return apply_many(changes)

    worker.pstore.record_intents = counting_intents  # type: ignore[method-assign]
    worker.pstore.apply_many = counting_applies  # type: ignore[method-assign]
    reader = sqlite3.connect(db_path, check_same_thread=False)
    if before_start is not None:
        before_start(worker)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            statuses = dict(reader.execute("SELECT id, status FROM payments").fetchall())
            open_ops = reader.execute("SELECT count(*) FROM payment_operations WHERE status = 'pending'").fetchone()[0]
            if all(s in final for s in statuses.values()) and open_ops == 0:
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.02)
    finally:
        worker.stop()
        store.close()
    attempts = reader.execute("SELECT payment_id, operation, status, attempt_no FROM payment_attempts"
                              " ORDER BY payment_id, started_at_ms, attempt_id").fetchall()
    return worker, statuses, attempts, calls


def test_a_batch_of_new_payments_takes_one_intent_transaction_and_a_few_applies(tmp_path: Path) -> None:
    n = 200
    ids = [f"pay_{i:024d}" for i in range(n)]
    worker, statuses, attempts, calls = _run(tmp_path, [(pid, "tok_visa") for pid in ids], {"captured"},
                                             psps=("psp_a", "psp_b"), inflight_max=1024, batch_records_max=256)
    assert statuses == {pid: "captured" for pid in ids}
    assert sorted(attempts) == sorted([(pid, "authorize", "approved", 1) for pid in ids]
                                      + [(pid, "capture", "approved", 1) for pid in ids])
    # All 200 were queued at once by the start-up scan and fit one batch (half of inflight_max):
    # ONE transaction recorded every authorization
    # intent (the captures' came with the authorizations' outcomes), and the outcomes were applied in
    # a few transactions (one per wave of answers), not one per payment.
    assert calls["record_intents"] == 1 and calls["intents"] == n
    assert 2 <= calls["apply_many"] <= 10, calls
    # Nothing went through the one-payment path: its intents and outcomes go one at a time to the group
    # commit, the batch step's outcomes as one list per wave (2 changes a payment: authorized, captured).
    assert worker.intents.items == 0 and worker.applies.singles == 0 and worker.applies.items == 2 * n
    # The ledger balances and every payment is booked once.
    db = sqlite3.connect(tmp_path / "gateway.db")
    assert db.execute("SELECT sum(debit) - sum(credit) FROM ledger_entries").fetchone()[0] == 0
    assert db.execute("SELECT count(DISTINCT payment_id) FROM ledger_entries").fetchone()[0] == n


def test_what_needs_more_than_one_call_leaves_the_batch_with_the_outcome_of_the_one_payment_path(
        tmp_path: Path) -> None:
    # Three errors at most per PSP: never enough to open its breaker (which would fail them instead).
    tokens = {"tok_visa": 20, "tok_psp_error_once": 3, "tok_decline_stolen": 6, "tok_timeout": 4,
              "tok_timeout_capture": 2}
    payments = [(f"pay_{n:08d}{i:016d}", t) for n, (t, k) in enumerate(tokens.items()) for i in range(k)]
    worker, statuses, attempts, calls = _run(
        tmp_path, payments, {"captured", "failed", "authorized", "pending_verification"},
        psps=("psp_a", "psp_b"), inflight_max=256, batch_records_max=256, reconcile_interval_ms=100)
    by_token = {t: [pid for pid, tok in payments if tok == t] for t in tokens}
    db = sqlite3.connect(tmp_path / "gateway.db")
    of = {pid: [(op, st, no) for p, op, st, no in attempts if p == pid] for pid, _ in payments}
    for pid in by_token["tok_visa"]:
        assert statuses[pid] == "captured" and of[pid] == [("authorize", "approved", 1), ("capture", "approved", 1)]
    for pid in by_token["tok_psp_error_once"]:
        # The first call errs (once per simulated PSP): the payment left the batch, failed over, and was
        # captured once the next attempt was approved.
        auths = [a for a in of[pid] if a[0] == "authorize"]
        assert statuses[pid] == "captured", (pid, of[pid])
        assert len(auths) >= 2 and auths[-1][1] == "approved" and {a[1] for a in auths[:-1]} == {"error"}
        assert [a[2] for a in auths] == list(range(1, len(auths) + 1))
        assert of[pid][len(auths):] == [("capture", "approved", 1)]
    for pid in by_token["tok_decline_stolen"]:
        assert statuses[pid] == "failed" and of[pid] == [("authorize", "hard_decline", 1)]
    for pid in by_token["tok_timeout"]:
        # A timeout is never a decline: pending verification, then resolved by its key (approved).
        assert statuses[pid] in ("captured", "pending_verification"), (pid, of[pid])
        assert [a for a in of[pid] if a[0] == "authorize"] in ([("authorize", "approved", 1)],
                                                               [("authorize", "timeout", 1)])
        trail = db.execute("SELECT new_status FROM audit_log WHERE payment_id = ? ORDER BY id", (pid,)).fetchall()
        assert trail[0] == ("pending_verification",), trail
    for pid in by_token["tok_timeout_capture"]:
        # The capture's answer is lost: the operation waits for verification (one attempt, never a
        # second capture call under a new key), then its key resolves it.
        assert of[pid][0] == ("authorize", "approved", 1) and [a[:1] + a[2:] for a in of[pid][1:]] == [("capture", 1)]
        assert statuses[pid] in ("captured", "authorized")
    # The retries' intents went through the one-payment path, the first calls' in the batch.
    retries = sum(len([a for a in of[pid] if a[0] == "authorize"]) - 1 for pid in by_token["tok_psp_error_once"])
    assert worker.intents.items == retries >= len(by_token["tok_psp_error_once"])
    assert calls["intents"] == len(payments) + retries


def test_a_batch_spills_over_to_the_next_psp_once_the_preferred_one_has_no_room() -> None:
    async def main() -> tuple[list[str], dict[str, int]]:
        router = Router([PSPRoute("psp_a", 100, 0, 200), PSPRoute("psp_b", 300, 0, 200)])  # psp_a: cheaper
        clients = {p.name: Bulkhead(InProcessPSPClient(SimulatedPSP(p, seed=1, time_scale=0)), 5)
                   for p in (PSP_A, PSP_B)}
        runs = [AuthorizationRun(sm.new_payment(f"pay_{i:024d}", "m_1", 1000, "EUR"), router, clients,
                                 lambda: 1, token="tok_visa") for i in range(12)]
        # The whole batch is routed before any call goes out (its intents come first).
        rows = [run.next_call() for run in runs]
        chosen = [row.psp for row in rows if row is not None]
        promised = {name: c.promised for name, c in clients.items()}
        results = await asyncio.gather(*(run.send() for run in runs))
        assert all(r.outcome.value == "approved" for r in results)
        assert all(c.promised == 0 and c.inflight == 0 for c in clients.values())
        return chosen, promised

    chosen, promised = asyncio.run(main())
    # Five fit behind psp_a's bulkhead, the next five go to psp_b; when both are full, the ranking.
    assert chosen == ["psp_a"] * 5 + ["psp_b"] * 5 + ["psp_a"] * 2
    assert promised == {"psp_a": 7, "psp_b": 5}


def test_a_payment_whose_psp_call_raised_is_taken_up_by_the_next_scan(tmp_path: Path) -> None:
    # The first authorization call raises (a bug, a broken connection: not a PSP outcome). Its payment
    # keeps its `started` attempt; the next scan (not a restart) asks the PSP about that key, which it
    # never saw: the payment fails `psp_not_processed`, never charged. The others are captured.
    ids = [f"pay_{i:024d}" for i in range(20)]
    raised: list[str] = []

    def once(worker: Worker) -> None:
        for client in worker.clients.values():
            authorize = client.authorize

            async def flaky(*, _authorize: Any = authorize, **kw: Any) -> Any:
                if not raised:
                    raised.append(kw["reference"])
                    raise RuntimeError("connection reset in the client")
                return await _authorize(**kw)

            client.authorize = flaky  # type: ignore[method-assign]

    worker, statuses, attempts, _ = _run(tmp_path, [(pid, "tok_visa") for pid in ids], {"captured", "failed"},
                                         psps=("psp_a", "psp_b"), reconcile_interval_ms=50, before_start=once)
    assert len(raised) == 1 and worker.errors >= 1
    assert statuses == {pid: ("failed" if pid == raised[0] else "captured") for pid in ids}
    assert [(op, st) for pid, op, st, _ in attempts if pid == raised[0]] == [("authorize", "not_processed")]
    code = sqlite3.connect(tmp_path / "gateway.db").execute(
        "SELECT json_extract(body, '$.failure_code') FROM payments WHERE id = ?", (raised[0],)).fetchone()[0]
    assert code == "psp_not_processed"
