"""Settlement reconciliation: the strict parser (every error path), the matcher on crafted files, and
whole runs against a real store (SQLite, and PostgreSQL when the shared server is up): stored runs,
idempotency by file hash, fee corrections as new balanced postings with an audit row."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from gateway.domain import ledger
from gateway.domain import settlement as st
from gateway.domain.settlement import GatewayEvent, SettlementFileError, match, parse_settlement
from gateway.processing import reconcile as rc
from gateway.store.ledger import insert_postings
from gateway.store.postgres import PostgresStore
from gateway.store.processing import ProcessingStore
from gateway.store.sqlite import SqliteStore
from support import throwaway_pg_store

HEADER = "reference,amount,currency,fee,net,status\n"
DAY = date(2026, 11, 20)
DAY_START_MS = int(datetime(2026, 11, 20, tzinfo=UTC).timestamp() * 1000)


def csv_bytes(*lines: str) -> bytes:
    return (HEADER + "".join(line + "\n" for line in lines)).encode()


def parse_error(data: bytes) -> SettlementFileError:
    with pytest.raises(SettlementFileError) as info:
        parse_settlement(data)
    return info.value


# -- parser -------------------------------------------------------------------------------------


def test_parser_reads_captures_and_refunds_with_line_numbers() -> None:
    rows = parse_settlement(csv_bytes("pay_1,1000,USD,25,975,captured", "pay_1,-400,USD,0,-400,refunded",
                                      "pay_2,500,JPY,18,482,captured"))
    assert [(r.line, r.reference, r.amount, r.currency, r.fee, r.net, r.status) for r in rows] == [
        (2, "pay_1", 1000, "USD", 25, 975, "captured"),
        (3, "pay_1", -400, "USD", 0, -400, "refunded"),
        (4, "pay_2", 500, "JPY", 18, 482, "captured"),
    ]


def test_parser_accepts_crlf_a_bom_quoted_fields_and_a_header_only_file() -> None:
    data = b"\xef\xbb\xbf" + csv_bytes('"pay_1",1000,USD,25,975,captured').replace(b"\n", b"\r\n")
    assert [r.reference for r in parse_settlement(data)] == ["pay_1"]
    assert parse_settlement(HEADER.encode()) == []
    assert parse_settlement(HEADER.rstrip("\n").encode()) == []


@pytest.mark.parametrize(
    ("data", "line", "fragment"),
    [
        (b"", 1, "file is empty"),
        (b"reference,amount,currency,fee,net\n", 1, "header is"),
        (b"ref,amount,currency,fee,net,status\n", 1, "header is"),
        (csv_bytes("pay_1,1000,USD,25,975"), 2, "5 fields, expected 6"),
        (csv_bytes("pay_1,1000,USD,25,975,captured,x"), 2, "7 fields, expected 6"),
        (csv_bytes("pay_1,1000,USD,25,975,captured", "pay_2,abc,USD,0,0,captured"), 3, "amount 'abc' is not an integer"),
        (csv_bytes("pay_1,10.00,USD,0,10.00,captured"), 2, "must be an integer in minor units"),
        (csv_bytes("pay_1,+100,USD,0,100,captured"), 2, "amount '+100' is not an integer"),
        (csv_bytes("pay_1,1000000000001,USD,0,1000000000001,captured"), 2, "beyond"),
        (csv_bytes("pay_1,1000,XYZ,25,975,captured"), 2, "currency 'XYZ' is not an ISO 4217 code"),
        (csv_bytes("pay_1,1000,usd,25,975,captured"), 2, "currency 'usd'"),
        (csv_bytes("pay_1,1000,USDX,25,975,captured"), 2, "currency 'USDX'"),
        (csv_bytes("pay_1,1000,USD,x,975,captured"), 2, "fee 'x' is not an integer"),
        (csv_bytes("pay_1,1000,USD,25,x,captured"), 2, "net 'x' is not an integer"),
        (csv_bytes("pay_1,1000,USD,-25,1025,captured"), 2, "fee -25 is negative"),
        (csv_bytes("pay_1,1000,USD,25,970,captured"), 2, "fee 25 + net 970 != amount 1000"),
        (csv_bytes("pay_1,1000,USD,25,975,settled"), 2, "status 'settled' is not one of captured, refunded"),
        (csv_bytes("pay_1,-1000,USD,0,-1000,captured"), 2, "captured line needs a positive amount"),
        (csv_bytes("pay_1,0,USD,0,0,captured"), 2, "captured line needs a positive amount"),
        (csv_bytes("pay_1,400,USD,0,400,refunded"), 2, "refunded line needs a negative amount"),
        (csv_bytes(",1000,USD,25,975,captured"), 2, "reference must be 1..255 characters"),
        (csv_bytes("p" * 256 + ",1000,USD,25,975,captured"), 2, "reference must be 1..255 characters"),
        (csv_bytes(" pay_1,1000,USD,25,975,captured"), 2, "spaces or control characters"),
        (csv_bytes("pay_1,1000,USD,25,975,captured", "", "pay_2,1000,USD,25,975,captured"), 3, "blank line"),
        (csv_bytes('pay_1,1000,USD,25,975,captured', '"pay_2,1000,USD,25,975,captured'), 3, "not valid CSV"),
        (csv_bytes("pay_1,1000,USD,25,975,captured", "x" * 1025), 3, "more than settlement_line_bytes_max=1024"),
        (HEADER.encode() + b"pay_\xff,1000,USD,25,975,captured\n", 2, "not UTF-8"),
    ],
)
def test_parser_refuses_a_bad_line_and_names_it(data: bytes, line: int, fragment: str) -> None:
    err = parse_error(data)
    assert err.line == line
    assert fragment in str(err)
    assert str(err).startswith(f"line {line}: ")


def test_parser_never_echoes_a_card_number() -> None:
    err = parse_error(csv_bytes("4242424242424242,1000,USD,25,975,captured"))
    assert err.line == 2 and "card number" in str(err) and "4242" not in str(err)
    err = parse_error(csv_bytes("pay_1,4242424242424242,USD,25,975,captured"))
    assert err.line == 2 and "4242" not in str(err)


def test_parser_limits_file_bytes_and_line_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "SETTLEMENT_FILE_BYTES_MAX", 64)
    err = parse_error(csv_bytes("pay_1,1000,USD,25,975,captured", "pay_2,1000,USD,25,975,captured"))
    assert err.line is None and "settlement_file_bytes_max=64" in str(err)
    monkeypatch.setattr(st, "SETTLEMENT_FILE_BYTES_MAX", 10**6)
    monkeypatch.setattr(st, "SETTLEMENT_LINES_MAX", 2)
    err = parse_error(csv_bytes(*[f"pay_{i},1000,USD,25,975,captured" for i in range(3)]))
    assert err.line == 4 and "more than settlement_lines_max=2" in str(err)
    assert len(parse_settlement(csv_bytes(*[f"pay_{i},1000,USD,25,975,captured" for i in range(2)]))) == 2


def test_settlement_day_comes_from_the_file_name() -> None:
    assert st.settlement_day_of("/x/psp_a-2026-11-20.csv") == DAY
    assert st.settlement_day_of("2026-11-20.csv") == DAY
    assert st.settlement_day_of("settlement.csv") is None
    assert st.settlement_day_of("psp_a-2026-13-40.csv") is None


# -- matcher ------------------------------------------------------------------------------------


def ev(key: str, pid: str, amount: int, fee: int = 25, currency: str = "USD", in_period: bool = True,
       at: int = 0) -> GatewayEvent:
    status = "captured" if amount > 0 else "refunded"
    fee = fee if amount > 0 else 0
    return GatewayEvent(key=key, payment_id=pid, status=status, amount=amount, currency=currency,
                        psp_reference="psp_a_1", started_at_ms=at, finished_at_ms=at, in_period=in_period,
                        receivable=amount - fee, fees=fee)


def kinds(result: st.MatchResult) -> list[tuple[str, str, int | None]]:
    return [(d["type"], d.get("reference", d.get("currency")), d.get("line")) for d in result.discrepancies]


def test_matcher_matches_captures_refunds_and_repeated_partial_captures() -> None:
    rows = parse_settlement(csv_bytes("pay_1,500,USD,25,475,captured", "pay_1,500,USD,25,475,captured",
                                      "pay_1,-300,USD,0,-300,refunded", "pay_2,1000,EUR,40,960,captured"))
    events = [ev("k1", "pay_1", 500), ev("k2", "pay_1", 500, at=1), ev("k3", "pay_1", -300, at=2),
              ev("k4", "pay_2", 1000, fee=40, currency="EUR")]
    result = match(rows, events)
    assert result.counts["matched"] == 4 and result.discrepancy_count == 0
    usd = result.file_totals["USD"]
    assert (usd.lines, usd.gross, usd.fees, usd.net) == (3, 700, 50, 650)
    led = result.ledger_totals["USD"]
    assert (led.gross, led.fees, led.net) == (700, 50, 650)


def test_matcher_reports_each_kind_of_discrepancy_on_its_line() -> None:
    rows = parse_settlement(csv_bytes(
        "pay_1,1000,USD,25,975,captured",   # 2 matched
        "pay_2,1000,USD,30,970,captured",   # 3 fee differs
        "pay_3,1000,EUR,25,975,captured",   # 4 currency differs
        "pay_4,1200,USD,25,1175,captured",  # 5 amount differs
        "pay_1,1000,USD,25,975,captured",   # 6 same line again
        "pay_9,700,USD,20,680,captured",    # 7 unknown to us
    ))
    events = [ev("k1", "pay_1", 1000), ev("k2", "pay_2", 1000), ev("k3", "pay_3", 1000),
              ev("k4", "pay_4", 1000), ev("k5", "pay_5", 800), ev("k6", "pay_6", 800, in_period=False)]
    result = match(rows, events)
    assert result.counts["matched"] == 1
    assert kinds(result)[:6] == [
        ("fee_mismatch", "pay_2", 3), ("currency_mismatch", "pay_3", 4), ("amount_mismatch", "pay_4", 5),
        ("duplicate", "pay_1", 6), ("missing_in_gateway", "pay_9", 7), ("missing_in_settlement", "pay_5", None),
    ]
    by_type = {d["type"]: d for d in result.discrepancies}
    assert by_type["fee_mismatch"]["difference"] == 5
    assert by_type["amount_mismatch"]["difference"] == 200 and by_type["amount_mismatch"]["expected_amount"] == 1000
    assert by_type["duplicate"]["duplicate_of_line"] == 2
    # pay_6 was captured outside the file's day: not expected in it, not reported.
    assert all(d.get("reference") != "pay_6" for d in result.discrepancies)
    assert [e.payment_id for e, fee in result.fee_differences] == ["pay_2"]
    totals = [d for d in result.discrepancies if d["type"] == "totals_mismatch"]
    assert {d["currency"] for d in totals} == {"USD", "EUR"}
    for kind in st.KINDS:
        assert result.counts[kind] == sum(1 for d in result.discrepancies if d["type"] == kind) + (
            1 if kind == "matched" else 0)


def test_matcher_caps_listed_items_but_counts_them_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "REPORT_ITEMS_MAX", 3)
    rows = parse_settlement(csv_bytes(*[f"pay_{i},100,USD,1,99,captured" for i in range(10)]))
    result = match(rows, [])
    assert result.counts["missing_in_gateway"] == 10 and len(result.discrepancies) == 3


# -- runs against a real store --------------------------------------------------------------------

MERCHANT = "acct_recon"
PG_TABLES = ("reconciliation_runs, ledger_entries, audit_log, payment_attempts, payments, merchants")


def seed(store: SqliteStore | PostgresStore, payments: list[tuple[str, str, list[tuple[str, int, int]]]]) -> None:
    """Payments `(id, currency, [(operation, amount, fee)])` captured/refunded at psp_a during DAY, with
    the attempts and postings the worker would have written."""
    store.create_merchant("Recon", uuid.uuid4().hex + uuid.uuid4().hex, merchant_id=MERCHANT)
    pstore = ProcessingStore(store)
    at = DAY_START_MS + 3_600_000
    with pstore._tx() as conn:
        for pid, currency, ops in payments:
            total = sum(a for op, a, _ in ops if op == "capture")
            conn.execute("INSERT INTO payments (id, merchant_id, status, amount, currency, idempotency_key, created,"
                         " lsn, body, payment_method, auto_capture, amount_authorized, amount_captured, psp)"
                         " VALUES (?, ?, 'captured', ?, ?, NULL, 0, 0, '{}', 'tok_visa', 1, ?, ?, 'psp_a')",
                         (pid, MERCHANT, total, currency, total, total))
            postings = [ledger.hold(f"{pid}:auth:1:authorization_hold", pid, MERCHANT, currency, total, at)]
            for n, (op, amount, fee) in enumerate(ops, start=1):
                key = f"{pid}:{op}:{n}"
                at += 1000
                conn.execute(
                    "INSERT INTO payment_attempts (attempt_id, payment_id, attempt_no, operation, psp, idempotency_key,"
                    " amount, currency, status, final_capture, psp_reference, fee_minor, latency_ms, started_at_ms,"
                    " finished_at_ms) VALUES (?, ?, 1, ?, 'psp_a', ?, ?, ?, 'approved', 0, ?, ?, 1.0, ?, ?)",
                    (f"{key}#1", pid, op, key, amount, currency, f"psp_a_{pid}", fee, at - 10, at))
                if op == "capture":
                    postings.append(ledger.capture(f"{key}:capture", pid, MERCHANT, "psp_a", currency, amount, at))
                    if fee:
                        postings.append(ledger.psp_fee(f"{key}:psp_fee", pid, "psp_a", currency, fee, at))
                else:
                    postings.append(ledger.refund(f"{key}:refund", pid, MERCHANT, "psp_a", currency, amount, at))
            insert_postings(conn, postings)


@pytest.fixture(scope="module")
def pg_store() -> Iterator[PostgresStore]:
    yield from throwaway_pg_store("ut_rc")


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], SqliteStore | PostgresStore]:
    def factory() -> SqliteStore | PostgresStore:
        if request.param == "sqlite":
            s = SqliteStore(tmp_path / "gateway.db")
            s.migrate()
            return s
        pg: PostgresStore = request.getfixturevalue("pg_store")
        with pg.pool.connection() as conn:
            conn.execute(f"TRUNCATE {PG_TABLES} CASCADE")
        return pg

    return factory


SEEDED = [("pay_1", "USD", [("capture", 1000, 25), ("refund", 400, 0)]),
          ("pay_2", "USD", [("capture", 2000, 40)]),
          ("pay_3", "EUR", [("capture", 500, 18)])]
GOOD_FILE = csv_bytes("pay_1,1000,USD,25,975,captured", "pay_1,-400,USD,0,-400,refunded",
                      "pay_2,2000,USD,40,1960,captured", "pay_3,500,EUR,18,482,captured")


def test_run_of_a_matching_file_is_stored_and_the_same_file_returns_it(
    make_store: Callable[[], SqliteStore | PostgresStore],
) -> None:
    store = make_store()
    seed(store, SEEDED)
    first = rc.reconcile(store, "psp_a", GOOD_FILE, file_name="psp_a-2026-11-20.csv", day=DAY)
    assert first.ok and not first.existing
    assert first.report["counts"]["matched"] == 4 and first.report["discrepancies"] == 0
    assert first.report["totals"]["USD"]["file"] == {"lines": 3, "gross": 2600, "fees": 65, "net": 2535}
    assert first.report["totals"]["USD"]["ledger"]["net"] == 2535
    again = rc.reconcile(store, "psp_a", GOOD_FILE, file_name="psp_a-2026-11-20.csv", day=DAY)
    assert again.existing and again.report["run_id"] == first.report["run_id"]
    forced = rc.reconcile(store, "psp_a", GOOD_FILE, file_name="psp_a-2026-11-20.csv", day=DAY, force=True)
    assert not forced.existing and forced.report["run_id"] != first.report["run_id"] and forced.ok
    stored = rc.runs(ProcessingStore(store), "psp_a")
    assert [r["id"] for r in stored] == [forced.report["run_id"], first.report["run_id"]]
    assert stored[0]["lines"] == 4 and stored[0]["matched"] == 4 and stored[0]["forced"] == 1


def test_a_capture_missing_from_the_file_and_a_bad_file_store_nothing_wrong(
    make_store: Callable[[], SqliteStore | PostgresStore],
) -> None:
    store = make_store()
    seed(store, SEEDED)
    run = rc.reconcile(store, "psp_a", csv_bytes("pay_1,1000,USD,25,975,captured", "pay_1,-400,USD,0,-400,refunded",
                                                 "pay_3,500,EUR,18,482,captured"), file_name="f.csv", day=DAY)
    assert not run.ok
    assert [(d["type"], d.get("reference")) for d in run.report["items"]] == [
        ("missing_in_settlement", "pay_2"), ("totals_mismatch", None)]
    assert run.report["items"][1]["difference"] == {"gross": -2000, "fees": -40, "net": -1960}
    # Another day: pay_2 is not expected in that file, only what the file lists is matched.
    other = rc.reconcile(store, "psp_a", csv_bytes("pay_3,500,EUR,18,482,captured"), file_name="f.csv",
                         day=date(2026, 11, 21))
    assert other.ok
    with pytest.raises(SettlementFileError):
        rc.reconcile(store, "psp_a", csv_bytes("pay_3,500,EUR,18,480,captured"), file_name="f.csv", day=DAY)
    assert len(rc.runs(ProcessingStore(store))) == 2


def test_fee_corrections_are_new_balanced_postings_with_an_audit_row_and_are_never_posted_twice(
    make_store: Callable[[], SqliteStore | PostgresStore],
) -> None:
    store = make_store()
    seed(store, SEEDED)
    pstore = ProcessingStore(store)
    # The PSP charged 30 instead of 25 on pay_1 and 35 instead of 40 on pay_2.
    file = csv_bytes("pay_1,1000,USD,30,970,captured", "pay_1,-400,USD,0,-400,refunded",
                     "pay_2,2000,USD,35,1965,captured", "pay_3,500,EUR,18,482,captured")
    report_only = rc.reconcile(store, "psp_a", file, file_name="f.csv", day=DAY)
    assert report_only.report["counts"]["fee_mismatch"] == 2 and report_only.report["fee_corrections"] == []
    postings_before, _ = pstore.all_postings()
    # Report first, then apply: the stored run did not correct, so asking for corrections runs it again.
    applied = rc.reconcile(store, "psp_a", file, file_name="f.csv", day=DAY, apply_fee_corrections=True, actor="ana")
    assert not applied.existing
    corrections = applied.report["fee_corrections"]
    assert [(c["reference"], c["difference"]) for c in corrections] == [("pay_1", 5), ("pay_2", -5)]
    postings, violations = pstore.all_postings()
    assert violations == [] and ledger.check(postings) == []
    assert len(postings) == len(postings_before) + 2
    before = ledger.balances(postings_before)
    after = ledger.balances(postings)
    assert after[("fees:psp_a", "USD")] == before[("fees:psp_a", "USD")]  # +5 and -5
    assert after[("psp:psp_a:receivable", "USD")] == 2535 - 0  # what the file says the PSP owes
    trail = pstore.audit_trail("pay_1")
    assert trail[-1][2] == "reconciler:ana" and "booked 25, settled 30" in trail[-1][3]
    # The run that corrected is the stored answer now, with or without the flag.
    assert rc.reconcile(store, "psp_a", file, file_name="f.csv", day=DAY, apply_fee_corrections=True).existing
    # Run again: the corrections count as booked, so the file now matches and nothing is posted.
    again = rc.reconcile(store, "psp_a", file, file_name="f.csv", day=DAY, force=True, apply_fee_corrections=True)
    assert again.ok and again.report["fee_corrections"] == []
    assert len(pstore.all_postings()[0]) == len(postings)


def test_report_reads_as_one_line_per_discrepancy() -> None:
    report = {"run_id": "recon_x", "psp": "psp_a", "settlement_day": "2026-11-20", "file": "f.csv",
              "file_sha256": "0" * 64, "lines": 1, "counts": dict.fromkeys(st.KINDS, 0), "totals": {},
              "items": [{"type": "missing_in_gateway", "line": 2, "reference": "pay_9", "status": "captured",
                         "amount": 700, "currency": "USD", "fee": 20}],
              "discrepancies": 1, "ok": False, "finished_ms": 0}
    text = rc.format_report(report, existing=True)
    assert "missing_in_gateway: line 2: reference=pay_9 captured 700 USD fee 20: no such capture of ours at psp_a" in text
    assert "already reconciled" in text and text.endswith("result: 1 discrepancies")


# -- settlement files of the in-process simulators ----------------------------------------------


def test_exporter_writes_each_days_file_atomically_and_only_when_it_changed(tmp_path: Path) -> None:
    import asyncio

    from gateway.psp_sim import PSP_A, SimulatedPSP
    from gateway.psp_sim.export import SettlementExporter, settlement_path

    now = [DAY_START_MS / 1000 + 60]
    sim = SimulatedPSP(PSP_A, time_scale=0.0, clock=lambda: now[0])

    async def pay(ref: str, amount: int, refund: int = 0) -> None:
        auth = await sim.authorize(reference=ref, amount=amount, currency="USD", token="tok_visa",
                                   idempotency_key=f"{ref}:auth:1")
        assert auth.psp_reference is not None
        cap = await sim.capture(psp_reference=auth.psp_reference, amount=amount, idempotency_key=f"{ref}:capture:1")
        assert cap.outcome == "approved"
        if refund:
            await sim.refund(psp_reference=auth.psp_reference, amount=refund, idempotency_key=f"{ref}:refund:1")

    exporter = SettlementExporter({"psp_a": sim}, tmp_path / "settlements", interval_s=0.1)
    asyncio.run(pay("pay_1", 1000, refund=400))
    path = settlement_path(tmp_path / "settlements", "psp_a", DAY)
    assert exporter.export() == [path]
    rows = parse_settlement(path.read_bytes())
    assert [(r.reference, r.amount, r.fee, r.status) for r in rows] == [
        ("pay_1", 1000, PSP_A.fee_minor(1000), "captured"), ("pay_1", -400, 0, "refunded")]
    assert path.read_text() == sim.settlement_csv(DAY)
    assert exporter.export() == []  # nothing new
    now[0] += 86_400
    asyncio.run(pay("pay_2", 2000))
    next_day = settlement_path(tmp_path / "settlements", "psp_a", date(2026, 11, 21))
    exporter.start()
    exporter.stop()  # the final export
    assert [r.reference for r in parse_settlement(next_day.read_bytes())] == ["pay_2"]
    assert len(parse_settlement(path.read_bytes())) == 2
    assert sorted(p.name for p in (tmp_path / "settlements").iterdir()) == [
        "psp_a-2026-11-20.csv", "psp_a-2026-11-21.csv"]  # no temporary file left
