"""Reconciliation of a PSP's daily settlement file against our attempts and our ledger.

A PSP pays out what its settlement file says: one line per capture (`amount, fee, amount - fee,
captured`) and per refund (`-amount, 0, -amount, refunded`), `reference` being our payment id
(docs/psp.md). Reconciling one file is three steps:

1. `parse_settlement` reads the file strictly: the exact header, six fields per line, integer minor
   units, an ISO 4217 currency, `fee + net == amount`, a known status whose sign agrees with the
   amount, and limits on the file size, the line count and the line length. The first problem is a
   `SettlementFileError` that names its line: a file we cannot read completely is not reconciled
   at all (a partial reconciliation would report captures as missing that are only unread).
2. `load_events` reads what we booked for that PSP: every approved capture and refund attempt (one
   per PSP idempotency key, so a replayed call counts once) of the payments the file names and of
   the settlement day, with the ledger's movements on `psp:{p}:receivable` and `fees:{p}` for each.
3. `match` (pure, no I/O) pairs lines with events per (reference, kind) and classifies the rest:
   `matched`, `fee_mismatch`, `currency_mismatch`, `duplicate`, `amount_mismatch`,
   `missing_in_gateway` (the PSP settled something we have no record of), `missing_in_settlement`
   (we captured or refunded within the day and the PSP did not settle it), and per currency
   `totals_mismatch` (the file's gross, fees and net against the ledger's movements of the same
   events).

Fees are booked at capture from the PSP's answer (`{key}:psp_fee`: Dr `fees:{p}` / Cr
`psp:{p}:receivable`). When the file shows another fee for a capture whose amount and currency
agree, `reconcile(..., apply_fee_corrections=True)` posts the difference as a NEW balanced
`psp_fee` posting `{key}:fee_correction_{run}` (never an update) with an audit row, in the same
transaction as the run's record. Later runs include corrections in the booked fee, so a
correction is never posted twice.

Runs are stored in `reconciliation_runs` and are idempotent by (PSP, file SHA-256): the same file
again returns the stored run unless `force=True`, or unless fee corrections are asked for and the
stored run found fee differences it did not correct.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.domain import ledger

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore
    from gateway.store.processing import ProcessingStore
    from gateway.store.sqlite import SqliteStore

SETTLEMENT_CSV_HEADER = ("reference", "amount", "currency", "fee", "net", "status")
SETTLEMENT_FILE_BYTES_MAX = 128 * 1024 * 1024
SETTLEMENT_LINES_MAX = 1_000_000
SETTLEMENT_LINE_BYTES_MAX = 1024
REFERENCE_CHARS_MAX = 255
AMOUNT_MINOR_MAX = 10**12
# Discrepancies kept in a report (and in the stored run); the counts are always exact.
REPORT_ITEMS_MAX = 1_000
# How many payment ids one SQL `IN (...)` carries (SQLite allows 32766 parameters).
QUERY_IDS_MAX = 500
ACTOR_CHARS_MAX = 200
PSP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
STATUSES = ("captured", "refunded")
KINDS = (
    "matched",
    "amount_mismatch",
    "currency_mismatch",
    "fee_mismatch",
    "duplicate",
    "missing_in_gateway",
    "missing_in_settlement",
    "totals_mismatch",
)

_INT = re.compile(r"^-?[0-9]{1,19}$")
_DAY_IN_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})")


class SettlementFileError(ValueError):
    """The settlement file cannot be reconciled; `line` is 1-based (None: the file as a whole)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
        self.reason = message


@dataclass(frozen=True, slots=True)
class SettlementRow:
    line: int
    reference: str
    amount: int
    currency: str
    fee: int
    net: int
    status: str


# -- parsing ------------------------------------------------------------------------------------


_CURRENCY_KNOWN: dict[str, bool] = {}


def _currency_known(code: str) -> bool:
    """Whether `code` is an ISO 4217 currency the fast path accepts (the same table)."""
    known = _CURRENCY_KNOWN.get(code)
    if known is None:
        from gateway._fastpath import currency_exponent

        if len(_CURRENCY_KNOWN) >= 1024:
            _CURRENCY_KNOWN.clear()  # bounded: a file full of junk codes cannot grow it forever
        known = _CURRENCY_KNOWN[code] = len(code) == 3 and code.isascii() and code.isupper() and (
            currency_exponent(code) is not None
        )
    return known


def _int_field(name: str, raw: str, line: int) -> int:
    if not _INT.match(raw):
        if re.match(r"^-?[0-9]*[.,][0-9]*$", raw) and any(c.isdigit() for c in raw):
            raise SettlementFileError(f"{name} {_show(raw)} must be an integer in minor units (no decimal point)", line)
        raise SettlementFileError(f"{name} {_show(raw)} is not an integer", line)
    value = int(raw)
    if abs(value) > AMOUNT_MINOR_MAX:
        raise SettlementFileError(f"{name} {_show(raw)} is beyond ±{AMOUNT_MINOR_MAX} minor units", line)
    return value


def _show(raw: str) -> str:
    """A field for an error message: shortened, and never a card number."""
    from gateway._fastpath import contains_pan

    if contains_pan(raw):
        return "(a value that looks like a card number, not shown)"
    return repr(raw if len(raw) <= 40 else raw[:40] + "…")


def parse_settlement(data: bytes) -> list[SettlementRow]:
    """Every line of a settlement file, or a `SettlementFileError` naming the first bad line."""
    if len(data) > SETTLEMENT_FILE_BYTES_MAX:
        raise SettlementFileError(
            f"file is {len(data)} bytes, more than settlement_file_bytes_max={SETTLEMENT_FILE_BYTES_MAX}"
        )
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    if not raw_lines:
        raise SettlementFileError("file is empty (expected the header " + ",".join(SETTLEMENT_CSV_HEADER) + ")", 1)
    if len(raw_lines) - 1 > SETTLEMENT_LINES_MAX:
        raise SettlementFileError(
            f"file has {len(raw_lines) - 1} lines, more than settlement_lines_max={SETTLEMENT_LINES_MAX}",
            SETTLEMENT_LINES_MAX + 2,
        )
    texts: list[str] = []
    for i, raw in enumerate(raw_lines, start=1):
        if len(raw) > SETTLEMENT_LINE_BYTES_MAX:
            raise SettlementFileError(
                f"line is {len(raw)} bytes, more than settlement_line_bytes_max={SETTLEMENT_LINE_BYTES_MAX}", i
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SettlementFileError(f"not UTF-8 (byte {e.start + 1} of the line)", i) from None
        text = text.removesuffix("\r")
        if not text.strip():
            raise SettlementFileError("blank line", i)
        texts.append(text)

    rows: list[SettlementRow] = []
    reader = csv.reader(texts, strict=True)
    try:
        header = next(reader)
    except csv.Error as e:
        raise SettlementFileError(f"header is not valid CSV ({e})", 1) from None
    if tuple(header) != SETTLEMENT_CSV_HEADER:
        raise SettlementFileError(
            f"header is {','.join(header)[:120]!r}, expected {','.join(SETTLEMENT_CSV_HEADER)!r}", 1
        )
    line = 1
    while True:
        line += 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise SettlementFileError(f"not valid CSV ({e})", line) from None
        rows.append(_row(fields, line))
    return rows


def _row(fields: list[str], line: int) -> SettlementRow:
    if len(fields) != len(SETTLEMENT_CSV_HEADER):
        raise SettlementFileError(f"{len(fields)} fields, expected {len(SETTLEMENT_CSV_HEADER)}", line)
    reference, amount_s, currency, fee_s, net_s, status = fields
    if not reference or len(reference) > REFERENCE_CHARS_MAX:
        raise SettlementFileError(f"reference must be 1..{REFERENCE_CHARS_MAX} characters", line)
    if reference != reference.strip() or not reference.isprintable():
        raise SettlementFileError(f"reference {_show(reference)} has spaces or control characters", line)
    from gateway._fastpath import contains_pan

    if contains_pan(reference):
        # Never echoed, never stored: a card number has no business in a settlement reference.
        raise SettlementFileError("reference looks like a card number (not shown)", line)
    amount = _int_field("amount", amount_s, line)
    if not _currency_known(currency):
        raise SettlementFileError(f"currency {_show(currency)} is not an ISO 4217 code", line)
    fee = _int_field("fee", fee_s, line)
    net = _int_field("net", net_s, line)
    if fee < 0:
        raise SettlementFileError(f"fee {fee} is negative", line)
    if fee + net != amount:
        raise SettlementFileError(f"fee {fee} + net {net} != amount {amount}", line)
    if status not in STATUSES:
        raise SettlementFileError(f"status {_show(status)} is not one of {', '.join(STATUSES)}", line)
    if status == "captured" and amount <= 0:
        raise SettlementFileError(f"a captured line needs a positive amount, not {amount}", line)
    if status == "refunded" and amount >= 0:
        raise SettlementFileError(f"a refunded line needs a negative amount, not {amount}", line)
    return SettlementRow(line, reference, amount, currency, fee, net, status)


def settlement_day_of(path: str | Path) -> date | None:
    """The day in a file name such as `psp_a-2026-11-21.csv` or `2026-11-21.csv`, if any."""
    m = _DAY_IN_NAME.search(Path(path).name)
    if m is None:
        return None
    try:
        return date.fromisoformat(m.group(1))
    except ValueError:
        return None


# -- our side -----------------------------------------------------------------------------------


@dataclass(slots=True)
class GatewayEvent:
    """One capture or refund we booked at the PSP, as the settlement file should show it."""

    key: str  # the PSP idempotency key of the operation
    payment_id: str
    status: str  # captured | refunded
    amount: int  # signed like the file: refunds negative
    currency: str
    psp_reference: str | None
    started_at_ms: int
    finished_at_ms: int
    in_period: bool
    # Movements of the ledger for this operation (debit-positive), corrections included.
    receivable: int = 0
    fees: int = 0

    @property
    def fee(self) -> int:
        return self.fees


def _chunks(items: Sequence[str], size: int = QUERY_IDS_MAX) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def day_window_ms(day: date) -> tuple[int, int]:
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    return start, start + 86_400_000


_ATTEMPT_COLUMNS = (
    "SELECT idempotency_key, payment_id, operation, amount, currency, psp_reference, started_at_ms,"
    " coalesce(finished_at_ms, started_at_ms) FROM payment_attempts"
    " WHERE psp = ? AND status = 'approved' AND operation IN ('capture', 'refund')"
)


def load_events(
    pstore: ProcessingStore, psp: str, day: date, references: Iterable[str]
) -> dict[str, GatewayEvent]:
    """Our approved captures and refunds at `psp` for the payments in `references` and for `day`,
    by PSP idempotency key, with their ledger movements on the PSP's receivable and fee accounts.

    An operation counts in the day if its PSP call both started and finished within it: the PSP
    dated it between those two instants. One that straddles midnight is expected in neither file
    (it is still matched if a file lists it)."""
    start, end = day_window_ms(day)
    rows: list[tuple[Any, ...]] = []
    with pstore._read() as conn:
        rows += conn.execute(_ATTEMPT_COLUMNS + " AND started_at_ms >= ? AND started_at_ms < ?",
                             (psp, start, end)).fetchall()
        refs = sorted(set(references))
        for chunk in _chunks(refs):
            marks = ",".join("?" * len(chunk))
            # By payment id only, the PSP filtered here: with `psp = ?` in the query the planner picks the
            # PSP's index and reads every settled attempt of the PSP for each chunk.
            rows += [
                r[1:] for r in conn.execute(
                    "SELECT psp, idempotency_key, payment_id, operation, amount, currency, psp_reference,"
                    " started_at_ms, coalesce(finished_at_ms, started_at_ms) FROM payment_attempts"
                    f" WHERE payment_id IN ({marks}) AND status = 'approved'",
                    chunk,
                ).fetchall()
                if r[0] == psp and r[3] in ("capture", "refund")
            ]
    events: dict[str, GatewayEvent] = {}
    for key, pid, op, amount, currency, psp_ref, started, finished in rows:
        if key in events:
            continue  # the same operation seen twice (both queries, or a replayed call)
        events[key] = GatewayEvent(
            key=key, payment_id=pid, status="captured" if op == "capture" else "refunded",
            amount=int(amount) if op == "capture" else -int(amount), currency=currency,
            psp_reference=psp_ref, started_at_ms=int(started), finished_at_ms=int(finished),
            in_period=start <= int(started) and int(finished) < end,
        )
    _attach_ledger(pstore, psp, events)
    return events


def _attach_ledger(pstore: ProcessingStore, psp: str, events: dict[str, GatewayEvent]) -> None:
    receivable, fees = ledger.psp_receivable(psp), ledger.psp_fees(psp)
    payment_ids = sorted({e.payment_id for e in events.values()})
    with pstore._read() as conn:
        for chunk in _chunks(payment_ids):
            marks = ",".join("?" * len(chunk))
            for posting_id, account, debit, credit in conn.execute(
                "SELECT posting_id, account, debit, credit FROM ledger_entries"
                f" WHERE payment_id IN ({marks}) AND account IN (?, ?)",
                (*chunk, receivable, fees),
            ).fetchall():
                # Posting ids are `{key}:{kind}` (docs/psp.md) and corrections `{key}:fee_correction_{run}`.
                event = events.get(posting_id.rsplit(":", 1)[0])
                if event is None:
                    continue
                if account == receivable:
                    event.receivable += int(debit) - int(credit)
                else:
                    event.fees += int(debit) - int(credit)


# -- matching -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Totals:
    lines: int = 0
    gross: int = 0
    fees: int = 0
    net: int = 0


@dataclass(slots=True)
class MatchResult:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    discrepancies: list[dict[str, Any]] = field(default_factory=list)
    file_totals: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    ledger_totals: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    # (event, file fee) of captures whose amount and currency agree but whose fee does not.
    fee_differences: list[tuple[GatewayEvent, int]] = field(default_factory=list)

    def add(self, kind: str, item: dict[str, Any]) -> None:
        self.counts[kind] += 1
        if len(self.discrepancies) < REPORT_ITEMS_MAX:
            self.discrepancies.append({"type": kind, **item})

    @property
    def discrepancy_count(self) -> int:
        return sum(n for k, n in self.counts.items() if k != "matched")


def _line_item(r: SettlementRow) -> dict[str, Any]:
    return {"line": r.line, "reference": r.reference, "status": r.status, "amount": r.amount,
            "currency": r.currency, "fee": r.fee}


def _event_item(e: GatewayEvent) -> dict[str, Any]:
    return {"psp_key": e.key, "psp_reference": e.psp_reference, "expected_amount": e.amount,
            "expected_currency": e.currency, "expected_fee": e.fee}


def _take(pending: list[GatewayEvent], pred: Any) -> GatewayEvent | None:
    for i, e in enumerate(pending):
        if pred(e):
            return pending.pop(i)
    return None


def match(rows: Sequence[SettlementRow], events: Iterable[GatewayEvent]) -> MatchResult:
    """Pairs settlement lines with our events per (reference, status); pure, no I/O.

    Within a group, in this order: same amount, currency and fee → matched; same amount and
    currency → fee_mismatch; same amount → currency_mismatch; a line identical to an earlier line
    of the file → duplicate; otherwise paired in order → amount_mismatch. Lines left over are
    missing_in_gateway; events of the day left over are missing_in_settlement. The ledger's totals
    are taken over every event paired with a line or expected in the day.
    """
    out = MatchResult()
    by_group: dict[tuple[str, str], list[GatewayEvent]] = defaultdict(list)
    for e in sorted(events, key=lambda e: (e.finished_at_ms, e.key)):
        by_group[(e.payment_id, e.status)].append(e)
    lines_by_group: dict[tuple[str, str], list[SettlementRow]] = defaultdict(list)
    for r in rows:
        lines_by_group[(r.reference, r.status)].append(r)
        t = out.file_totals[r.currency]
        t.lines += 1
        t.gross += r.amount
        t.fees += r.fee
        t.net += r.net
    in_scope: list[GatewayEvent] = []

    for group, group_rows in lines_by_group.items():
        pending = list(by_group.get(group, ()))
        left: list[SettlementRow] = []
        duplicates_of: dict[tuple[int, str, int, int], int] = {}

        for r in group_rows:
            sig = (r.amount, r.currency, r.fee, r.net)
            duplicates_of.setdefault(sig, r.line)
            found = _take(pending, lambda e, r=r: e.amount == r.amount and e.currency == r.currency and e.fee == r.fee)
            if found is not None:
                out.counts["matched"] += 1
                in_scope.append(found)
            else:
                left.append(r)
        rest: list[SettlementRow] = []
        for r in left:
            found = _take(pending, lambda e, r=r: e.amount == r.amount and e.currency == r.currency)
            if found is not None:
                in_scope.append(found)
                out.add("fee_mismatch", {**_line_item(r), **_event_item(found), "difference": r.fee - found.fee})
                if r.status == "captured":
                    out.fee_differences.append((found, r.fee))
                continue
            found = _take(pending, lambda e, r=r: e.amount == r.amount)
            if found is not None:
                in_scope.append(found)
                out.add("currency_mismatch", {**_line_item(r), **_event_item(found)})
                continue
            rest.append(r)
        for r in rest:
            sig = (r.amount, r.currency, r.fee, r.net)
            first = duplicates_of[sig]
            if first != r.line:
                out.add("duplicate", {**_line_item(r), "duplicate_of_line": first})
                continue
            found = pending.pop(0) if pending else None
            if found is not None:
                in_scope.append(found)
                out.add("amount_mismatch", {**_line_item(r), **_event_item(found),
                                            "difference": r.amount - found.amount})
            else:
                out.add("missing_in_gateway", _line_item(r))
        by_group[group] = pending  # what no line claimed

    for (payment_id, _status), pending in by_group.items():
        for e in pending:
            if e.in_period:
                in_scope.append(e)
                out.add("missing_in_settlement", {"reference": payment_id, "status": e.status, **_event_item(e),
                                                  "finished_at_ms": e.finished_at_ms})
    for e in in_scope:
        t = out.ledger_totals[e.currency]
        t.lines += 1
        t.gross += e.receivable + e.fees
        t.fees += e.fees
        t.net += e.receivable
    for currency in sorted(set(out.file_totals) | set(out.ledger_totals)):
        f, g = out.file_totals[currency], out.ledger_totals[currency]
        if (f.gross, f.fees, f.net) != (g.gross, g.fees, g.net):
            out.add("totals_mismatch", {"currency": currency, "file": asdict(f), "ledger": asdict(g),
                                        "difference": {"gross": f.gross - g.gross, "fees": f.fees - g.fees,
                                                       "net": f.net - g.net}})
    # In the file's order, then what the file lacks, then the totals.
    out.discrepancies.sort(key=lambda d: (0, d["line"], "") if "line" in d else
                           (1, 0, d["reference"]) if "reference" in d else (2, 0, d["currency"]))
    return out


# -- runs ---------------------------------------------------------------------------------------


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


def _reusable(stored: dict[str, Any], apply_fee_corrections: bool) -> bool:
    """Whether a stored run of the same file answers this request: always, unless corrections are
    asked for and that run found fee differences without correcting them (report first, then apply,
    is the expected way to work: it must not need --force)."""
    return not (apply_fee_corrections and stored["counts"]["fee_mismatch"] and not stored["fee_corrections"])


def _find_run(pstore: ProcessingStore, psp: str, sha256: str) -> dict[str, Any] | None:
    with pstore._read() as conn:
        row = conn.execute(
            "SELECT report FROM reconciliation_runs WHERE psp = ? AND file_sha256 = ?"
            " ORDER BY id DESC LIMIT 1",
            (psp, sha256),
        ).fetchone()
    return json.loads(row[0]) if row else None


def runs(pstore: ProcessingStore, psp: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The latest runs, newest first (their summaries, without the discrepancy lists)."""
    assert 1 <= limit <= 1000
    where, args = ("WHERE psp = ?", (psp,)) if psp else ("", ())
    with pstore._read() as conn:
        rows = conn.execute(
            "SELECT id, psp, file_sha256, file_name, settlement_day, lines, matched, discrepancies,"
            f" fee_corrections, forced, actor, finished_ms FROM reconciliation_runs {where}"
            " ORDER BY id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
    names = ("id", "psp", "file_sha256", "file_name", "settlement_day", "lines", "matched", "discrepancies",
             "fee_corrections", "forced", "actor", "finished_ms")
    return [dict(zip(names, r, strict=True)) for r in rows]


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
    from gateway.store.processing import ProcessingStore

    if not PSP_NAME.match(psp):
        raise ValueError(f"invalid PSP name {psp!r}")
    if not 1 <= len(actor) <= ACTOR_CHARS_MAX:
        raise ValueError(f"actor must be 1..{ACTOR_CHARS_MAX} characters")
    started = _now_ms()
    sha256 = hashlib.sha256(data).hexdigest()
    pstore = ProcessingStore(store)
    if not force:
        stored = _find_run(pstore, psp, sha256)
        if stored is not None and _reusable(stored, apply_fee_corrections):
            return RunReport(stored, existing=True)
    rows = parse_settlement(data)
    events = load_events(pstore, psp, day, (r.reference for r in rows))
    result = match(rows, events.values())
    run_id = _run_id()
    report: dict[str, Any] = {
        "run_id": run_id,
        "psp": psp,
        "file": Path(file_name).name[:255],
        "file_sha256": sha256,
        "file_bytes": len(data),
        "settlement_day": day.isoformat(),
        "lines": len(rows),
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
    with pstore._tx() as conn:
        if pstore.pg:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (f"reconcile:{psp}:{sha256}",))
        if not force:
            row = conn.execute(
                "SELECT report FROM reconciliation_runs WHERE psp = ? AND file_sha256 = ? ORDER BY id DESC LIMIT 1",
                (psp, sha256),
            ).fetchone()
            if row is not None and _reusable(json.loads(row[0]), apply_fee_corrections):
                return RunReport(json.loads(row[0]), existing=True)  # committed meanwhile by another run
        if apply_fee_corrections and result.fee_differences:
            report["fee_corrections"] = _post_fee_corrections(conn, psp, run_id, sha256, actor, result)
        report["finished_ms"] = _now_ms()
        report["ok"] = result.discrepancy_count == 0
        conn.execute(
            "INSERT INTO reconciliation_runs (id, psp, file_sha256, file_name, file_bytes, settlement_day, lines,"
            " matched, discrepancies, fee_corrections, forced, actor, report, started_ms, finished_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, psp, sha256, report["file"], len(data), day.isoformat(), len(rows),
             result.counts["matched"], result.discrepancy_count, len(report["fee_corrections"]), int(force),
             actor, json.dumps(report, separators=(",", ":")), started, report["finished_ms"]),
        )
    return RunReport(report, existing=False)


def _post_fee_corrections(
    conn: Any, psp: str, run_id: str, sha256: str, actor: str, result: MatchResult
) -> list[dict[str, Any]]:
    """One new balanced `psp_fee` posting per capture whose settled fee differs from the booked one.

    The booked fee is read again inside this transaction (the caller holds the run's lock), so two
    forced runs of one file cannot both correct the same capture."""
    fees_account, receivable = ledger.psp_fees(psp), ledger.psp_receivable(psp)
    at = _now_ms()
    out: list[dict[str, Any]] = []
    postings: list[ledger.Posting] = []
    audits: list[tuple[Any, ...]] = []
    for event, file_fee in result.fee_differences:
        booked = 0
        for posting_id, debit, credit in conn.execute(
            "SELECT posting_id, debit, credit FROM ledger_entries WHERE payment_id = ? AND account = ?",
            (event.payment_id, fees_account),
        ).fetchall():
            if posting_id.rsplit(":", 1)[0] == event.key:
                booked += int(debit) - int(credit)
        diff = file_fee - booked
        if diff == 0:
            continue
        posting_id = f"{event.key}:fee_correction_{run_id}"
        lines = (
            (ledger.Line(fees_account, ledger.Direction.DEBIT, diff),
             ledger.Line(receivable, ledger.Direction.CREDIT, diff))
            if diff > 0
            else (ledger.Line(receivable, ledger.Direction.DEBIT, -diff),
                  ledger.Line(fees_account, ledger.Direction.CREDIT, -diff))
        )
        postings.append(ledger.Posting(posting_id, event.payment_id, ledger.PostingKind.PSP_FEE, event.currency,
                                       abs(diff), lines, at))
        status_row = conn.execute("SELECT status FROM payment_state WHERE payment_id = ?",
                                  (event.payment_id,)).fetchone()
        status = status_row[0] if status_row else "unknown"
        reason = (f"fee correction from {psp} settlement {sha256[:12]} (run {run_id}): booked {booked},"
                  f" settled {file_fee}, posted {diff:+d} {event.currency} as {posting_id}")
        audits.append((event.payment_id, status, status, f"reconciler:{actor}"[:200], reason, at))
        out.append({"reference": event.payment_id, "psp_key": event.key, "posting_id": posting_id,
                    "booked_fee": booked, "settled_fee": file_fee, "difference": diff, "currency": event.currency})
    conn.executemany(
        "INSERT INTO ledger_entries (posting_id, line_no, payment_id, kind, account, currency, debit,"
        " credit, at_ms, reverses) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(r.posting_id, r.line_no, r.payment_id, r.kind, r.account, r.currency, r.debit, r.credit, r.at_ms,
          r.reverses) for p in postings for r in p.rows()],
    )
    conn.executemany(
        "INSERT INTO audit_log (payment_id, old_status, new_status, actor, reason, at_ms) VALUES (?, ?, ?, ?, ?, ?)",
        audits,
    )
    return out


# -- presentation -------------------------------------------------------------------------------


def _describe(item: dict[str, Any], psp: str) -> str:
    kind = item["type"]
    if kind == "totals_mismatch":
        f, g, d = item["file"], item["ledger"], item["difference"]
        return (f"{item['currency']} gross/fees/net: file {f['gross']}/{f['fees']}/{f['net']},"
                f" ledger {g['gross']}/{g['fees']}/{g['net']}, difference {d['gross']:+d}/{d['fees']:+d}/{d['net']:+d}")
    if kind == "missing_in_settlement":
        return (f"reference={item['reference']} {item['status']} {item['expected_amount']} {item['expected_currency']}"
                f" (psp_key={item['psp_key']}) is booked but not in the file")
    head = (f"line {item['line']}: reference={item['reference']} {item['status']} {item['amount']} {item['currency']}"
            f" fee {item['fee']}")
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
    head = (f"reconciliation {report['run_id']}: {report['psp']} {report['settlement_day']}"
            f" ({report['file']}, sha256 {report['file_sha256'][:12]}…, {report['lines']} lines)")
    out.append(head)
    if existing:
        when = datetime.fromtimestamp(report["finished_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        out.append(f"  this file was already reconciled at {when}; showing that run (--force runs it again)")
    counts = report["counts"]
    out.append("  " + ", ".join(f"{k} {counts[k]}" for k in KINDS))
    for currency, t in report["totals"].items():
        f, g = t["file"], t["ledger"]
        out.append(f"  {currency}: file gross {f['gross']} fees {f['fees']} net {f['net']} ({f['lines']} lines)"
                   f" | ledger gross {g['gross']} fees {g['fees']} net {g['net']} ({g['lines']} operations)")
    for item in report["items"]:
        out.append(f"  {item['type']}: {_describe(item, report['psp'])}")
    if report.get("items_truncated"):
        out.append(f"  … {report['discrepancies'] - len(report['items'])} more discrepancies not listed"
                   f" (report_items_max={REPORT_ITEMS_MAX})")
    for c in report.get("fee_corrections", []):
        out.append(f"  fee correction posted: {c['posting_id']} {c['difference']:+d} {c['currency']}"
                   f" (booked {c['booked_fee']}, settled {c['settled_fee']})")
    out.append("result: all lines matched" if report["ok"]
               else f"result: {report['discrepancies']} discrepancies")
    return "\n".join(out)
