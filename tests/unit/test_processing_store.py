"""The processing store against the state machine and a plain model of a payment's amounts.

A hypothesis property drives random sequences of capture/void/refund requests (accepted or refused
by the store, then succeeded or failed at the "PSP") and checks the stored payment, the refusal
codes, the audit log and the ledger against an independent model after every step.

Every test runs on both backends: SQLite (embedded mode) and PostgreSQL (cluster mode, the real
server of `deploy/services.sh`, one throw-away schema per module, emptied before each example).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import psycopg
import pytest
from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, AttemptStatus, Outcome, ProcessingResult
from gateway.store.postgres import PostgresStore
from gateway.store.processing import (
    Accepted,
    Change,
    Intent,
    OperationFinish,
    ProcessingStore,
    Refused,
    StaleVersion,
)
from gateway.store.sqlite import SqliteStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import throwaway_pg_store

PID = "pay_" + "a" * 24
MERCHANT = "acct_model"
AUTHORIZED = 10_000


# Every table the processing path writes, emptied between examples (TRUNCATE skips the append-only triggers).
PG_TABLES = ("ledger_entries, audit_log, payment_attempts, payment_operations, operation_idempotency_keys,"
             " idempotency_keys, payments, merchant_keys, merchant_audit, merchants")

Store = SqliteStore | PostgresStore
# Makes a fresh store with the model's merchant and payment; the argument is a scratch folder.
Factory = Callable[[str], Store]


@pytest.fixture(scope="module")
def pg_store() -> Iterator[PostgresStore]:
    yield from throwaway_pg_store("ut")


@pytest.fixture(params=["sqlite", "postgres"])
def factory(request: pytest.FixtureRequest) -> Factory:
    if request.param == "sqlite":
        def make_sqlite(folder: str) -> Store:
            store = SqliteStore(Path(folder) / "gateway.db")
            store.migrate()
            return store

        return make_sqlite
    return _emptied(request.getfixturevalue("pg_store"))


def _emptied(pg: PostgresStore) -> Factory:
    """A factory that hands out the one PostgreSQL store of the module with its tables emptied."""
    def make_pg(_folder: str) -> Store:
        with pg.pool.connection() as conn:
            conn.execute(f"TRUNCATE {PG_TABLES}")  # type: ignore[call-overload]
        return pg

    return make_pg


def _close(store: Store) -> None:
    if isinstance(store, SqliteStore):
        store.close()


def _accept(store: Store, payment_ids: list[str], first_lsn: int = 1) -> None:
    """The `payment.created` WAL records of `payment_ids`, applied as the tailer applies them."""
    records = []
    for n, pid in enumerate(payment_ids):
        payment = {"id": pid, "object": "payment", "status": "processing", "amount": AUTHORIZED, "currency": "EUR",
                   "payment_method": "tok_visa", "capture": False, "created": 1}
        record = {"type": "payment.created", "merchant_id": MERCHANT, "status_code": 201, "created_ms": 1,
                  "payment": payment}
        records.append((first_lsn + n, msgspec.json.encode(record)))
    store.apply_wal_records(records)


def _store(folder: str, make: Factory) -> tuple[Store, ProcessingStore]:
    store = make(folder)
    store.create_merchant("Model Shop", "0" * 64, merchant_id=MERCHANT)
    _accept(store, [PID])
    pstore = ProcessingStore(store)
    rec = pstore.load(PID)
    assert rec is not None
    t = sm.authorize(rec.payment, amount=AUTHORIZED, psp="psp_a", psp_reference="psp_ref_1", actor="worker", at_ms=2)
    result = ProcessingResult(payment=t.payment, outcome=Outcome.APPROVED, transitions=[t],
                              postings=ledger.postings_for_transition(t, f"{PID}:auth:1"))
    pstore.apply(result, base_version=rec.payment.version)
    return store, pstore


@dataclass
class Model:
    status: str = "authorized"
    captured: int = 0
    refunded: int = 0
    final: bool = False

    def refusal(self, kind: str, amount: int | None) -> str | None:
        if self.status == "canceled":
            return "payment_already_canceled"
        if kind == "void":
            return None if self.status == "authorized" else "payment_not_voidable"
        if kind == "capture":
            if self.status not in ("authorized", "captured") or self.final:
                return "payment_not_capturable"
            a = AUTHORIZED - self.captured if amount is None else amount
            return "amount_exceeds_capturable" if a > AUTHORIZED - self.captured else None
        if self.status == "refunded":
            return "payment_already_refunded"
        if self.status not in ("captured", "partially_refunded"):
            return "payment_not_refundable"
        a = self.captured - self.refunded if amount is None else amount
        return "refund_exceeds_captured" if a > self.captured - self.refunded else None

    def apply(self, kind: str, amount: int, final: bool) -> None:
        if kind == "capture":
            self.captured += amount
            self.status = "captured"
            self.final = final or self.captured == AUTHORIZED
        elif kind == "void":
            self.status, self.final = "canceled", True
        else:
            self.refunded += amount
            self.final = True
            self.status = "refunded" if self.refunded == self.captured else "partially_refunded"


def _transition(p: sm.Payment, kind: str, amount: int, final: bool) -> sm.Transition:
    if kind == "capture":
        return sm.capture(p, amount=amount, final_capture=final, actor="merchant", at_ms=3)
    if kind == "void":
        return sm.void(p, actor="merchant", at_ms=3)
    return sm.refund(p, amount=amount, actor="merchant", at_ms=3)


requests = st.lists(
    st.tuples(
        st.sampled_from(["capture", "capture", "refund", "refund", "void"]),
        st.one_of(st.none(), st.integers(1, AUTHORIZED + 10), st.integers(1, 3000)),
        st.booleans(),  # final_capture
        st.booleans(),  # the PSP approves
    ),
    max_size=12,
)


# The factory fixture makes a fresh store for every example, so sharing it across examples is safe.
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(requests)
def test_random_operation_sequences_never_diverge_from_the_model(
    factory: Factory, ops: list[tuple[str, int | None, bool, bool]]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store, pstore = _store(folder, factory)
        model = Model()
        successes = 0
        try:
            for kind, amount, final, approve in ops:
                expected = model.refusal(kind, amount)
                got = pstore.accept_operation(MERCHANT, PID, kind, amount, final and kind == "capture", None, None,
                                              f"{kind}{amount}{final}")
                if expected is not None:
                    assert isinstance(got, Refused) and got.status_code == 422 and got.code == expected, (got, model)
                    continue
                assert isinstance(got, Accepted), (got, model)
                op = got.operation
                rec = pstore.load(PID)
                assert rec is not None
                if not approve:
                    pstore.finish_operation(OperationFinish(op.id, "failed", "processor_declined"), PID)
                    continue
                t = _transition(rec.payment, kind, op.amount, op.final_capture)
                fee = 7 if kind == "capture" else 0
                result = ProcessingResult(
                    payment=t.payment, outcome=Outcome.APPROVED, transitions=[t],
                    postings=ledger.postings_for_transition(t, op.psp_idempotency_key, fee_minor=fee))
                pstore.apply(result, base_version=rec.payment.version, operation_id=op.id,
                             finish=OperationFinish(op.id, "succeeded"))
                model.apply(kind, op.amount, op.final_capture)
                successes += 1
                p = pstore.load(PID)
                assert p is not None
                assert (p.payment.status.value, p.payment.amount_captured, p.payment.amount_refunded,
                        p.payment.capture_final) == (model.status, model.captured, model.refunded, model.final)
            postings, bad_rows = pstore.all_postings()
            assert bad_rows == [] and ledger.check(postings) == []
            bal = ledger.balances(postings)
            held = 0 if model.final else AUTHORIZED - model.captured
            assert bal.get((ledger.merchant_pending(MERCHANT), "EUR"), 0) == -held
            assert bal.get((ledger.merchant_available(MERCHANT), "EUR"), 0) == -(model.captured - model.refunded)
            trail = pstore.audit_trail(PID)
            assert len(trail) == 1 + successes and trail[-1][1] == model.status
            body = msgspec.json.decode(store.get_payment(MERCHANT, PID) or b"{}")
            assert (body["status"], body["amount_captured"], body["amount_refunded"]) == (
                model.status, model.captured, model.refunded)
            assert body["pending_operation"] is None
        finally:
            _close(store)


def test_two_writers_cannot_both_apply_a_transition(tmp_path: Path, factory: Factory) -> None:
    store, pstore = _store(str(tmp_path), factory)
    rec = pstore.load(PID)
    assert rec is not None
    first = sm.capture(rec.payment, amount=100, final_capture=False, actor="a", at_ms=3)
    second = sm.capture(rec.payment, amount=200, final_capture=False, actor="b", at_ms=3)
    pstore.apply(ProcessingResult(first.payment, Outcome.APPROVED, transitions=[first],
                                  postings=ledger.postings_for_transition(first, "k1")),
                 base_version=rec.payment.version)
    with pytest.raises(StaleVersion):
        pstore.apply(ProcessingResult(second.payment, Outcome.APPROVED, transitions=[second],
                                      postings=ledger.postings_for_transition(second, "k2")),
                     base_version=rec.payment.version)
    after = pstore.load(PID)
    assert after is not None and after.payment.amount_captured == 100
    postings, _ = pstore.all_postings()
    assert not any(p.posting_id.startswith("k2") for p in postings), "the losing write left nothing behind"
    assert len(pstore.audit_trail(PID)) == 2
    _close(store)


def test_one_operation_at_a_time_per_payment(tmp_path: Path, factory: Factory) -> None:
    store, pstore = _store(str(tmp_path), factory)
    assert isinstance(pstore.accept_operation(MERCHANT, PID, "capture", 100, False, None, None, "a"), Accepted)
    busy = pstore.accept_operation(MERCHANT, PID, "capture", 100, False, None, None, "b")
    assert isinstance(busy, Refused) and (busy.status_code, busy.code) == (409, "payment_operation_in_progress")
    assert pstore.accept_operation("acct_other", PID, "void", None, False, None, None, "c") is None
    _close(store)


def test_postgres_ledger_and_audit_log_refuse_updates_and_deletes(tmp_path: Path, pg_store: PostgresStore) -> None:
    _, pstore = _store(str(tmp_path), _emptied(pg_store))
    for statement in ("UPDATE ledger_entries SET debit = debit + 1", "DELETE FROM ledger_entries",
                      "UPDATE audit_log SET reason = 'rewritten'", "DELETE FROM audit_log"):
        with pytest.raises(psycopg.errors.RestrictViolation), pg_store.pool.connection() as conn:
            conn.execute(statement)  # type: ignore[call-overload]
    postings, bad_rows = pstore.all_postings()
    assert bad_rows == [] and len(postings) == 1 and ledger.check(postings) == []
    assert len(pstore.audit_trail(PID)) == 1


def test_postgres_claims_let_one_process_drive_a_payment_at_a_time(pg_store: PostgresStore) -> None:
    first, second = ProcessingStore(pg_store), ProcessingStore(pg_store)  # two sessions, as two workers
    try:
        assert first.claim(PID)
        assert not second.claim(PID), "a payment claimed by one worker is not free for another"
        first.release(PID)
        assert second.claim(PID)
        second.close()  # a worker that dies: its connection closes and the server drops its claims
        deadline = time.monotonic() + 5  # (once the server has noticed the closed connection)
        while not first.claim(PID):
            assert time.monotonic() < deadline, "the claim of a closed session was never released"
            time.sleep(0.01)
    finally:
        first.close()
        second.close()


def test_postgres_concurrent_operations_accept_one_whatever_their_keys(tmp_path: Path, pg_store: PostgresStore) -> None:
    _, pstore = _store(str(tmp_path), _emptied(pg_store))
    for keys in (["same"] * 8, [f"k{i}" for i in range(8)]):
        with ThreadPoolExecutor(8) as pool:  # as eight gateway processes at once
            got = list(pool.map(
                lambda key: pstore.accept_operation(MERCHANT, PID, "capture", 100, False, None, key, "fp"), keys))
        accepted = [g for g in got if isinstance(g, Accepted)]
        assert len(accepted) == 1, got
        expected = "idempotency_key_in_use" if keys[0] == "same" else "payment_operation_in_progress"
        assert all(isinstance(g, Refused) and (g.status_code, g.code) == (409, expected)
                   for g in got if not isinstance(g, Accepted)), got
        pstore.finish_operation(OperationFinish(accepted[0].operation.id, "failed", "processor_declined"), PID)


# -- batch interfaces: a batch of payments in, one transaction out ----------------------------------------

BATCH = ["pay_" + c * 24 for c in "bcd"]


def _started(pid: str, n: int = 1) -> AttemptRow:
    return AttemptRow(attempt_id=f"{pid}:auth:{n}", payment_id=pid, attempt_no=n, operation="authorize",
                      psp="psp_a", idempotency_key=f"{pid}:auth:{n}", amount=AUTHORIZED, currency="EUR",
                      status=AttemptStatus.STARTED, started_at_ms=2)


def test_load_many_creates_the_state_of_every_accepted_payment_and_keeps_the_order(
    tmp_path: Path, factory: Factory
) -> None:
    store, pstore = _store(str(tmp_path), factory)
    _accept(store, BATCH, first_lsn=2)
    missing = "pay_" + "z" * 24
    recs = pstore.load_many([BATCH[2], missing, BATCH[0], PID, BATCH[1]])
    assert recs[1] is None, "a payment never accepted has no state"
    got = [(r.payment.id, r.payment.status.value, r.payment.version, r.token) for r in recs if r is not None]
    first_version = got[0][2]
    assert got == [(BATCH[2], "processing", first_version, "tok_visa"), (BATCH[0], "processing", first_version,
                   "tok_visa"), (PID, "authorized", got[2][2], "tok_visa"), (BATCH[1], "processing", first_version,
                   "tok_visa")]
    assert got[2][2] > first_version, "the authorized payment's stored version, not a fresh state"
    assert [r.payment.id if r else None for r in pstore.load_many(BATCH)] == BATCH, "loaded again: same rows"
    _close(store)


def test_record_intents_writes_every_started_attempt_of_a_batch(tmp_path: Path, factory: Factory) -> None:
    store, pstore = _store(str(tmp_path), factory)
    _accept(store, BATCH, first_lsn=2)
    pstore.record_intents([Intent(_started(pid)) for pid in BATCH])
    for pid in BATCH:
        rows = pstore.attempts(pid)
        assert [(a.attempt_id, a.status, a.amount) for a in rows] == [(f"{pid}:auth:1", AttemptStatus.STARTED,
                                                                        AUTHORIZED)]
    pstore.record_intents([])  # an empty batch writes nothing and does not fail
    assert pstore.attempts(PID) == []
    _close(store)


def test_two_rows_of_one_attempt_in_a_batch_end_as_sequential_upserts_would(tmp_path: Path, factory: Factory) -> None:
    # PostgreSQL writes a batch as one multi-row upsert, which may not touch a row twice: the store
    # folds a later row of an attempt into the first, keeping what sequential upserts would keep.
    store, pstore = _store(str(tmp_path), factory)
    _accept(store, BATCH, first_lsn=2)
    started = replace(_started(PID), psp_reference="ref_first")
    finished = replace(_started(PID), status=AttemptStatus.APPROVED, psp_reference=None, code="ok_code",
                       finished_at_ms=9)
    other = _started(BATCH[1])
    pstore.record_intents([Intent(started), Intent(other), Intent(finished)])
    [row] = pstore.attempts(PID)
    assert (row.status, row.psp_reference, row.code, row.finished_at_ms) == (
        AttemptStatus.APPROVED, "ref_first", "ok_code", 9)
    assert [a.status for a in pstore.attempts(BATCH[1])] == [AttemptStatus.STARTED]
    _close(store)


def _authorize(rec_payment: sm.Payment, pid: str) -> ProcessingResult:
    t = sm.authorize(rec_payment, amount=AUTHORIZED, psp="psp_a", psp_reference=f"ref_{pid}", actor="worker", at_ms=2)
    done = replace(_started(pid), status=AttemptStatus.APPROVED, finished_at_ms=3)
    return ProcessingResult(payment=t.payment, outcome=Outcome.APPROVED, attempts=[done], transitions=[t],
                            postings=ledger.postings_for_transition(t, f"{pid}:auth:1"))


def test_apply_many_writes_a_batch_and_refuses_a_stale_version_without_writing_that_payment(
    tmp_path: Path, factory: Factory
) -> None:
    store, pstore = _store(str(tmp_path), factory)
    _accept(store, BATCH, first_lsn=2)
    recs = pstore.load_many(BATCH)
    assert all(r is not None for r in recs)
    # Another writer authorizes the middle payment first: the batch's change of it is now stale.
    stale_rec = recs[1]
    assert stale_rec is not None
    winner = _authorize(stale_rec.payment, BATCH[1])
    pstore.apply(winner, base_version=stale_rec.payment.version)
    trail_before = pstore.audit_trail(BATCH[1])
    body_before = store.get_payment(MERCHANT, BATCH[1])
    changes = []
    for r in recs:
        assert r is not None
        result = _authorize(r.payment, r.payment.id)
        result.attempts[0] = replace(result.attempts[0], attempt_id=f"{r.payment.id}:auth:batch")
        changes.append(Change(result, r.payment.version))
    out = pstore.apply_many(changes)
    assert [(a.payment_id, a.applied, a.operation) for a in out] == [
        (BATCH[0], True, None), (BATCH[1], False, None), (BATCH[2], True, None)]
    after = pstore.load_many(BATCH)
    for pid, rec in zip(BATCH, after, strict=True):
        assert rec is not None and rec.payment.status.value == "authorized" and rec.payment.psp_reference == f"ref_{pid}"
    assert [r.payment.version for r in after if r] == [
        changes[0].result.payment.version, winner.payment.version, changes[2].result.payment.version]
    # The stale payment: no attempt, audit row, posting or body of the refused change.
    assert [a.attempt_id for a in pstore.attempts(BATCH[1])] == [f"{BATCH[1]}:auth:1"]
    assert pstore.audit_trail(BATCH[1]) == trail_before and store.get_payment(MERCHANT, BATCH[1]) == body_before
    # The others: every row of their change, in the same transaction.
    for pid in (BATCH[0], BATCH[2]):
        assert [a.attempt_id for a in pstore.attempts(pid)] == [f"{pid}:auth:batch"]
        assert [t[1] for t in pstore.audit_trail(pid)] == ["authorized"]
        body = msgspec.json.decode(store.get_payment(MERCHANT, pid) or b"{}")
        assert (body["status"], body["amount_authorized"], [a["id"] for a in body["attempts"]]) == (
            "authorized", AUTHORIZED, [f"{pid}:auth:batch"])
    postings, bad_rows = pstore.all_postings()
    assert bad_rows == [] and ledger.check(postings) == []
    assert sorted(p.payment_id for p in postings) == sorted([PID, *BATCH]), "one authorization posting each"
    _close(store)


def test_apply_many_refuses_two_changes_of_one_payment(tmp_path: Path, factory: Factory) -> None:
    store, pstore = _store(str(tmp_path), factory)
    _accept(store, BATCH[:1], first_lsn=2)
    [rec] = pstore.load_many(BATCH[:1])
    assert rec is not None
    change = Change(_authorize(rec.payment, BATCH[0]), rec.payment.version)
    with pytest.raises(ValueError, match="two changes of one payment"):
        pstore.apply_many([change, change])
    after = pstore.load(BATCH[0])
    assert after is not None and after.payment.status.value == "processing", "nothing of the batch was written"
    assert pstore.apply_many([]) == []
    _close(store)
