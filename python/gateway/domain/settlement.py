"""The rules of a PSP's daily settlement file: its format, and how its lines match what we booked.

A PSP pays out what its settlement file says: one line per capture (`amount, fee, amount - fee,
captured`) and per refund (`-amount, 0, -amount, refunded`), `reference` being our payment id
(docs/psp.md, docs/reconciliation.md). Pure: no I/O; `processing/reconcile.py` reads our side through
`store/reconcile.py` and decides with what is here.

- `parse_settlement` reads a file strictly (exact header, six fields, integer minor units, ISO 4217,
  `fee + net == amount`, a known status whose sign agrees with the amount, bounded sizes) and raises a
  `SettlementFileError` naming the first bad line: a file is reconciled completely or not at all.
- `match` pairs lines with `GatewayEvent`s per (reference, status) and classifies the rest (`KINDS`);
  it never drops a count: only the listed items are capped at `REPORT_ITEMS_MAX`.
- `fee_correction` is the balanced `psp_fee` posting `{key}:fee_correction_{run}` that brings a
  capture's booked fee to the settled one: a NEW posting, never an update.
Currency table and card-number check: the fast path's pure functions (`gateway._fastpath`).
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import PurePath
from typing import Any

from gateway._fastpath import contains_pan, currency_exponent
from gateway.domain import ledger

SETTLEMENT_CSV_HEADER = ("reference", "amount", "currency", "fee", "net", "status")
SETTLEMENT_FILE_BYTES_MAX = 128 * 1024 * 1024
SETTLEMENT_LINES_MAX = 1_000_000
SETTLEMENT_LINE_BYTES_MAX = 1024
REFERENCE_CHARS_MAX = 255
AMOUNT_MINOR_MAX = 10**12
# Discrepancies kept in a report (and in the stored run); the counts are always exact.
REPORT_ITEMS_MAX = 1_000
ACTOR_CHARS_MAX = 200
PSP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
STATUSES = ("captured", "refunded")
# What `match` classifies a line or an event as, in the order of a report's counts.
KINDS = ("matched", "amount_mismatch", "currency_mismatch", "fee_mismatch", "duplicate", "missing_in_gateway",
         "missing_in_settlement", "totals_mismatch")

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
        if len(_CURRENCY_KNOWN) >= 1024:
            _CURRENCY_KNOWN.clear()  # bounded: a file full of junk codes cannot grow it forever
        known = len(code) == 3 and code.isascii() and code.isupper() and currency_exponent(code) is not None
        _CURRENCY_KNOWN[code] = known
    return known


def _int_field(name: str, raw: str, line: int) -> int:
    if not _INT.match(raw):
        if re.match(r"^-?[0-9]*[.,][0-9]*$", raw) and any(c.isdigit() for c in raw):
            raise SettlementFileError(
                f"{name} {_show(raw)} must be an integer in minor units (no decimal point)", line
            )
        raise SettlementFileError(f"{name} {_show(raw)} is not an integer", line)
    value = int(raw)
    if abs(value) > AMOUNT_MINOR_MAX:
        raise SettlementFileError(f"{name} {_show(raw)} is beyond ±{AMOUNT_MINOR_MAX} minor units", line)
    return value


def _show(raw: str) -> str:
    """A field for an error message: shortened, and never a card number."""
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
        raise SettlementFileError(
            "file is empty (expected the header " + ",".join(SETTLEMENT_CSV_HEADER) + ")", 1
        )
    if len(raw_lines) - 1 > SETTLEMENT_LINES_MAX:
        raise SettlementFileError(
            f"file has {len(raw_lines) - 1} lines, more than settlement_lines_max={SETTLEMENT_LINES_MAX}",
            SETTLEMENT_LINES_MAX + 2,
        )
    texts: list[str] = []
    for i, raw in enumerate(raw_lines, start=1):
        if len(raw) > SETTLEMENT_LINE_BYTES_MAX:
            raise SettlementFileError(
                f"line is {len(raw)} bytes, more than settlement_line_bytes_max={SETTLEMENT_LINE_BYTES_MAX}",
                i,
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


def settlement_day_of(path: str | PurePath) -> date | None:
    """The day in a file name such as `psp_a-2026-11-21.csv` or `2026-11-21.csv`, if any."""
    m = _DAY_IN_NAME.search(PurePath(path).name)
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


@dataclass(frozen=True, slots=True)
class SettledAttempt:
    """An approved capture or refund attempt at a PSP as stored (`amount` positive, as sent)."""

    key: str  # the PSP idempotency key: one per operation, however often the call was replayed
    payment_id: str
    operation: str  # capture | refund
    amount: int
    currency: str
    psp_reference: str | None
    started_at_ms: int
    finished_at_ms: int


@dataclass(frozen=True, slots=True)
class Movement:
    """One ledger line on a PSP's receivable or fee account: `amount` is debit - credit."""

    posting_id: str
    account: str
    amount: int


def day_window_ms(day: date) -> tuple[int, int]:
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    return start, start + 86_400_000


def operation_key(posting_id: str) -> str:
    """The PSP idempotency key a posting belongs to: posting ids are `{key}:{kind}` (docs/psp.md) and
    fee corrections `{key}:fee_correction_{run}`."""
    return posting_id.rsplit(":", 1)[0]


def gateway_events(attempts: Iterable[SettledAttempt], day: date) -> dict[str, GatewayEvent]:
    """Our side of the file by PSP idempotency key; an operation seen twice counts once.

    An operation counts in the day if its PSP call both started and finished within it: the PSP
    dated it between those two instants. One that straddles midnight is expected in neither file
    (it is still matched if a file lists it)."""
    start, end = day_window_ms(day)
    events: dict[str, GatewayEvent] = {}
    for a in attempts:
        if a.key in events:
            continue
        capture = a.operation == "capture"
        events[a.key] = GatewayEvent(
            key=a.key, payment_id=a.payment_id, status="captured" if capture else "refunded",
            amount=a.amount if capture else -a.amount, currency=a.currency, psp_reference=a.psp_reference,
            started_at_ms=a.started_at_ms, finished_at_ms=a.finished_at_ms,
            in_period=start <= a.started_at_ms and a.finished_at_ms < end,
        )
    return events


def add_movements(events: dict[str, GatewayEvent], psp: str, movements: Iterable[Movement]) -> None:
    """Adds each event's ledger movements on `psp`'s receivable and fee accounts (others ignored)."""
    receivable, fees = ledger.psp_receivable(psp), ledger.psp_fees(psp)
    for m in movements:
        event = events.get(operation_key(m.posting_id))
        if event is None:
            continue
        if m.account == receivable:
            event.receivable += m.amount
        elif m.account == fees:
            event.fees += m.amount


def booked_fee(key: str, fee_movements: Iterable[Movement]) -> int:
    """The fee booked for operation `key` (its `psp_fee` posting and every correction of it)."""
    return sum(m.amount for m in fee_movements if operation_key(m.posting_id) == key)


def fee_correction(
    psp: str, event: GatewayEvent, booked: int, settled: int, run_id: str, at_ms: int
) -> ledger.Posting | None:
    """The balanced `psp_fee` posting that moves the booked fee to the settled one; None if equal."""
    diff = settled - booked
    if diff == 0:
        return None
    fees, receivable = ledger.psp_fees(psp), ledger.psp_receivable(psp)
    debit, credit = (fees, receivable) if diff > 0 else (receivable, fees)
    lines = (ledger.Line(debit, ledger.Direction.DEBIT, abs(diff)),
             ledger.Line(credit, ledger.Direction.CREDIT, abs(diff)))
    posting_id = f"{event.key}:fee_correction_{run_id}"
    return ledger.Posting(posting_id, event.payment_id, ledger.PostingKind.PSP_FEE, event.currency, abs(diff),
                          lines, at_ms)


def reusable(stored: dict[str, Any], apply_fee_corrections: bool) -> bool:
    """Whether a stored run of the same file answers this request: always, unless corrections are
    asked for and that run found fee differences without correcting them (report first, then apply,
    is the expected way to work: it must not need --force)."""
    return not (apply_fee_corrections and stored["counts"]["fee_mismatch"] and not stored["fee_corrections"])


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
            found = _take(
                pending, lambda e, r=r: e.amount == r.amount and e.currency == r.currency and e.fee == r.fee
            )
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
                out.add(
                    "fee_mismatch", {**_line_item(r), **_event_item(found), "difference": r.fee - found.fee}
                )
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
                out.add(
                    "amount_mismatch",
                    {**_line_item(r), **_event_item(found), "difference": r.amount - found.amount},
                )
            else:
                out.add("missing_in_gateway", _line_item(r))
        by_group[group] = pending  # what no line claimed

    for (payment_id, _status), pending in by_group.items():
        for e in pending:
            if e.in_period:
                in_scope.append(e)
                out.add(
                    "missing_in_settlement",
                    {
                        "reference": payment_id,
                        "status": e.status,
                        **_event_item(e),
                        "finished_at_ms": e.finished_at_ms,
                    },
                )
    for e in in_scope:
        t = out.ledger_totals[e.currency]
        t.lines += 1
        t.gross += e.receivable + e.fees
        t.fees += e.fees
        t.net += e.receivable
    for currency in sorted(set(out.file_totals) | set(out.ledger_totals)):
        f, g = out.file_totals[currency], out.ledger_totals[currency]
        if (f.gross, f.fees, f.net) != (g.gross, g.fees, g.net):
            out.add(
                "totals_mismatch",
                {
                    "currency": currency,
                    "file": asdict(f),
                    "ledger": asdict(g),
                    "difference": {"gross": f.gross - g.gross, "fees": f.fees - g.fees, "net": f.net - g.net},
                },
            )
    # In the file's order, then what the file lacks, then the totals.
    out.discrepancies.sort(
        key=lambda d: (
            (0, d["line"], "")
            if "line" in d
            else (1, 0, d["reference"])
            if "reference" in d
            else (2, 0, d["currency"])
        )
    )
    return out
