"""The processing store against the state machine and a plain model of a payment's amounts.

A hypothesis property drives random sequences of capture/void/refund requests (accepted or refused
by the store, then succeeded or failed at the "PSP") and checks the stored payment, the refusal
codes, the audit log and the ledger against an independent model after every step.

Every test runs on both backends: SQLite (embedded mode) and PostgreSQL (cluster mode, the real
server of `deploy/services.sh`, one throw-away schema per module, emptied before each example).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psycopg
import pytest
from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import Outcome, ProcessingResult
from gateway.store.postgres import PostgresStore
from gateway.store.processing import Accepted, OperationFinish, ProcessingStore, Refused, StaleVersion
from gateway.store.sqlite import SqliteStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PID = "pay_" + "a" * 24
MERCHANT = "acct_model"
AUTHORIZED = 10_000


DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://gateway:gateway@127.0.0.1:15432/gateway")
# Every table the processing path writes, emptied between examples (TRUNCATE skips the append-only triggers).
PG_TABLES = ("ledger_entries, audit_log, payment_attempts, payment_operations, operation_idempotency_keys,"
             " payment_state, idempotency_keys, payments, merchants")

Store = SqliteStore | PostgresStore
# Makes a fresh store with the model's merchant and payment; the argument is a scratch folder.
Factory = Callable[[str], Store]


@pytest.fixture(scope="module")
def pg_store() -> Iterator[PostgresStore]:
    try:
        psycopg.connect(DATABASE_URL, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at {DATABASE_URL} (bash deploy/services.sh up): {e}")
    store = PostgresStore(DATABASE_URL, f"ut_{uuid.uuid4().hex[:10]}")
    store.migrate()
    yield store
    store.drop_schema()
    store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def factory(request: pytest.FixtureRequest) -> Factory:
    if request.param == "sqlite":
        def make_sqlite(folder: str) -> Store:
            store = SqliteStore(Path(folder) / "gateway.db")
            store.migrate()
            return store

        return make_sqlite
    pg: PostgresStore = request.getfixturevalue("pg_store")

    def make_pg(_folder: str) -> Store:
        with pg.pool.connection() as conn:
            conn.execute(f"TRUNCATE {PG_TABLES}")  # type: ignore[call-overload]
        return pg

    return make_pg


def _close(store: Store) -> None:
    if isinstance(store, SqliteStore):
        store.close()


def _store(folder: str, make: Factory) -> tuple[Store, ProcessingStore]:
    store = make(folder)
    store.create_merchant("Model Shop", "0" * 64, merchant_id=MERCHANT)
    payment = {"id": PID, "object": "payment", "status": "processing", "amount": AUTHORIZED, "currency": "EUR",
               "payment_method": "tok_visa", "capture": False, "created": 1}
    record = {"type": "payment.created", "merchant_id": MERCHANT, "status_code": 201, "created_ms": 1,
              "payment": payment}
    store.apply_wal_records([(1, msgspec.json.encode(record))])
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
    def make(_folder: str) -> Store:
        with pg_store.pool.connection() as conn:
            conn.execute(f"TRUNCATE {PG_TABLES}")  # type: ignore[call-overload]
        return pg_store

    _, pstore = _store(str(tmp_path), make)
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
    def make(_folder: str) -> Store:
        with pg_store.pool.connection() as conn:
            conn.execute(f"TRUNCATE {PG_TABLES}")  # type: ignore[call-overload]
        return pg_store

    _, pstore = _store(str(tmp_path), make)
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
