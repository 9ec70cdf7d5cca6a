"""Reconciliation of a PSP's daily settlement file against our attempts and our ledger: the orchestration.

The file's rules and the matching are `gateway.domain.settlement` (pure); every SQL statement is
`gateway.store.reconcile`. Reconciling one file (docs/reconciliation.md):

1. `parse_settlement` reads the whole file or raises `SettlementFileError` naming its line: a file we
   cannot read completely is not reconciled at all (a partial run would report unread captures missing).
2. `load_events` reads what we booked for that PSP: every approved capture and refund attempt (one per
   PSP idempotency key, so a replayed call counts once) of the payments the file names and of the
   settlement day, with the ledger's movements on `psp:{p}:receivable` and `fees:{p}` for each.
3. `match` pairs lines with events and classifies the rest; the report is built and stored here.

Fees are booked at capture from the PSP's answer (`{key}:psp_fee`: Dr `fees:{p}` / Cr
`psp:{p}:receivable`). When the file shows another fee for a capture whose amount and currency agree,
`reconcile(..., apply_fee_corrections=True)` posts the difference as a NEW balanced `psp_fee` posting
`{key}:fee_correction_{run}` (never an update) with an audit row, in the same transaction as the run's
record, reading the booked fee again inside it. Later runs include corrections in the booked fee, so a
correction is never posted twice.

Runs are stored in `reconciliation_runs` and are idempotent by (PSP, file SHA-256): the same file again
returns the stored run unless `force=True`, or unless fee corrections are asked for and the stored run
found fee differences it did not correct. A report is the run's record: `format_report` renders it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain import settlement as st
from gateway.domain.settlement import GatewayEvent, MatchResult
from gateway.store.processing import ProcessingStore
from gateway.store.reconcile import ReconcileStore, RunTx

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore
    from gateway.store.sqlite import SqliteStore


@dataclass(frozen=True, slots=True)
class RunReport:
    report: dict[str, Any]
    existing: bool  # an earlier run of the same file, returned as stored

    @property
    def ok(self) -> bool:
        return bool(self.report["ok"])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _run_id() -> str:
    """Sortable by creation time (nanoseconds, hex), unique by its random suffix."""
    return f"recon_{time.time_ns():016x}{secrets.token_hex(4)}"


def load_events(
    pstore: ProcessingStore, psp: str, day: date, references: Iterable[str]
) -> dict[str, GatewayEvent]:
    """Our approved captures and refunds at `psp` for the payments in `references` and for `day`,
    by PSP idempotency key, with their ledger movements on the PSP's receivable and fee accounts."""
    rstore = ReconcileStore(pstore)
    start, end = st.day_window_ms(day)
    events = st.gateway_events(rstore.settled_attempts(psp, start, end, list(references)), day)
    accounts = (ledger.psp_receivable(psp), ledger.psp_fees(psp))
    st.add_movements(events, psp, rstore.movements([e.payment_id for e in events.values()], accounts))
    return events


def runs(pstore: ProcessingStore, psp: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The latest runs, newest first (their summaries, without the discrepancy lists)."""
    return ReconcileStore(pstore).runs(psp, limit)


def _report(
    psp: str,
    data: bytes,
    sha256: str,
    file_name: str,
    day: date,
    lines: int,
    result: MatchResult,
    actor: str,
    force: bool,
    started: int,
) -> dict[str, Any]:
    """A run's report before its fee corrections and its end (`fee_corrections`, `finished_ms`, `ok`)."""
    return {
        "run_id": _run_id(),
        "psp": psp,
        "file": Path(file_name).name[:255],
        "file_sha256": sha256,
        "file_bytes": len(data),
        "settlement_day": day.isoformat(),
        "lines": lines,
        "counts": result.counts,
        "discrepancies": result.discrepancy_count,
        "items": result.discrepancies,
        "items_truncated": result.discrepancy_count > len(result.discrepancies),
        "totals": {
            c: {"file": asdict(result.file_totals[c]), "ledger": asdict(result.ledger_totals[c])}
            for c in sorted(set(result.file_totals) | set(result.ledger_totals))
        },
        "fee_corrections": [],
        "forced": force,
        "actor": actor,
        "started_ms": started,
    }


def reconcile(
    store: SqliteStore | PostgresStore,
    psp: str,
    data: bytes,
    *,
    file_name: str,
    day: date,
    actor: str = "operator",
    apply_fee_corrections: bool = False,
    force: bool = False,
) -> RunReport:
    """Reconciles one settlement file and stores the run; raises `SettlementFileError` for a bad file.

    The same file (by SHA-256) for the same PSP returns the stored run unless `force`."""
    if not st.PSP_NAME.match(psp):
        raise ValueError(f"invalid PSP name {psp!r}")
    if not 1 <= len(actor) <= st.ACTOR_CHARS_MAX:
        raise ValueError(f"actor must be 1..{st.ACTOR_CHARS_MAX} characters")
    started = _now_ms()
    sha256 = hashlib.sha256(data).hexdigest()
    pstore = ProcessingStore(store)
    rstore = ReconcileStore(pstore)
    if not force:
        stored = rstore.stored_run(psp, sha256)
        if stored is not None and st.reusable(stored, apply_fee_corrections):
            return RunReport(stored, existing=True)
    rows = st.parse_settlement(data)
    events = load_events(pstore, psp, day, (r.reference for r in rows))
    result = st.match(rows, events.values())
    report = _report(psp, data, sha256, file_name, day, len(rows), result, actor, force, started)
    with rstore.run_tx(psp, sha256) as tx:
        if not force:
            stored = tx.stored_run(psp, sha256)
            if stored is not None and st.reusable(stored, apply_fee_corrections):
                return RunReport(stored, existing=True)  # committed meanwhile by another run
        if apply_fee_corrections and result.fee_differences:
            report["fee_corrections"] = _post_fee_corrections(
                tx, psp, report["run_id"], sha256, actor, result
            )
        report["finished_ms"] = _now_ms()
        report["ok"] = result.discrepancy_count == 0
        tx.insert_run(report)
    return RunReport(report, existing=False)


def _post_fee_corrections(
    tx: RunTx, psp: str, run_id: str, sha256: str, actor: str, result: MatchResult
) -> list[dict[str, Any]]:
    """One new balanced `psp_fee` posting per capture whose settled fee differs from the booked one.

    The booked fee is read again inside this transaction (the caller holds the run's lock), so two
    forced runs of one file cannot both correct the same capture."""
    at = _now_ms()
    payment_ids = [event.payment_id for event, _ in result.fee_differences]
    fee_movements: dict[str, list[st.Movement]] = {}
    for m in tx.movements(payment_ids, (ledger.psp_fees(psp),)):
        fee_movements.setdefault(st.operation_key(m.posting_id), []).append(m)
    statuses = tx.statuses(payment_ids)
    out: list[dict[str, Any]] = []
    postings: list[ledger.Posting] = []
    audits: list[sm.AuditRow] = []
    for event, file_fee in result.fee_differences:
        booked = st.booked_fee(event.key, fee_movements.get(event.key, ()))
        posting = st.fee_correction(psp, event, booked, file_fee, run_id, at)
        if posting is None:
            continue
        diff = file_fee - booked
        postings.append(posting)
        status = statuses.get(event.payment_id, "unknown")
        reason = (
            f"fee correction from {psp} settlement {sha256[:12]} (run {run_id}): booked {booked},"
            f" settled {file_fee}, posted {diff:+d} {event.currency} as {posting.posting_id}"
        )
        audits.append(sm.AuditRow(event.payment_id, status, status, f"reconciler:{actor}"[:200], reason, at))
        out.append(
            {
                "reference": event.payment_id,
                "psp_key": event.key,
                "posting_id": posting.posting_id,
                "booked_fee": booked,
                "settled_fee": file_fee,
                "difference": diff,
                "currency": event.currency,
            }
        )
    tx.post(postings, audits)
    return out


# -- presentation -------------------------------------------------------------------------------


def _describe(item: dict[str, Any], psp: str) -> str:
    kind = item["type"]
    if kind == "totals_mismatch":
        f, g, d = item["file"], item["ledger"], item["difference"]
        return (
            f"{item['currency']} gross/fees/net: file {f['gross']}/{f['fees']}/{f['net']},"
            f" ledger {g['gross']}/{g['fees']}/{g['net']},"
            f" difference {d['gross']:+d}/{d['fees']:+d}/{d['net']:+d}"
        )
    if kind == "missing_in_settlement":
        return (
            f"reference={item['reference']} {item['status']} {item['expected_amount']}"
            f" {item['expected_currency']} (psp_key={item['psp_key']}) is booked but not in the file"
        )
    head = (
        f"line {item['line']}: reference={item['reference']} {item['status']} {item['amount']}"
        f" {item['currency']} fee {item['fee']}"
    )
    if kind == "fee_mismatch":
        return f"{head}: booked fee {item['expected_fee']} ({item['difference']:+d})"
    if kind == "amount_mismatch":
        return f"{head}: booked amount {item['expected_amount']} ({item['difference']:+d})"
    if kind == "currency_mismatch":
        return f"{head}: booked in {item['expected_currency']}"
    if kind == "duplicate":
        return f"{head}: same as line {item['duplicate_of_line']}"
    operation = "capture" if item["status"] == "captured" else "refund"
    return f"{head}: no such {operation} of ours at {psp}"


def format_report(report: dict[str, Any], existing: bool = False) -> str:
    """The report for a terminal."""
    out: list[str] = []
    head = (
        f"reconciliation {report['run_id']}: {report['psp']} {report['settlement_day']}"
        f" ({report['file']}, sha256 {report['file_sha256'][:12]}…, {report['lines']} lines)"
    )
    out.append(head)
    if existing:
        when = datetime.fromtimestamp(report["finished_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        out.append(f"  this file was already reconciled at {when}; showing that run (--force runs it again)")
    counts = report["counts"]
    out.append("  " + ", ".join(f"{k} {counts[k]}" for k in st.KINDS))
    for currency, t in report["totals"].items():
        f, g = t["file"], t["ledger"]
        out.append(
            f"  {currency}: file gross {f['gross']} fees {f['fees']} net {f['net']} ({f['lines']} lines)"
            f" | ledger gross {g['gross']} fees {g['fees']} net {g['net']} ({g['lines']} operations)"
        )
    for item in report["items"]:
        out.append(f"  {item['type']}: {_describe(item, report['psp'])}")
    if report.get("items_truncated"):
        out.append(
            f"  … {report['discrepancies'] - len(report['items'])} more discrepancies not listed"
            f" (report_items_max={st.REPORT_ITEMS_MAX})"
        )
    for c in report.get("fee_corrections", []):
        out.append(
            f"  fee correction posted: {c['posting_id']} {c['difference']:+d} {c['currency']}"
            f" (booked {c['booked_fee']}, settled {c['settled_fee']})"
        )
    out.append(
        "result: all lines matched" if report["ok"] else f"result: {report['discrepancies']} discrepancies"
    )
    return "\n".join(out)
