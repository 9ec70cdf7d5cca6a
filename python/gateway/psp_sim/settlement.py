"""The simulated PSP's settlement book: the lines a processor pays out, and its daily CSV file.

One line per capture (fee charged: `amount, fee, amount - fee, captured`) and per refund (`-amount, 0,
-amount, refunded`), dated by the simulator's clock (UTC), in processing order. The file format is the
one the gateway's reconciliation reads (`SETTLEMENT_CSV_HEADER`, domain/settlement.py). The book is
bounded: at `lines_max` lines `has_room()` is false and the simulator refuses the operation, so memory
stays bounded however long a simulator runs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from gateway.domain.settlement import SETTLEMENT_CSV_HEADER

__all__ = ["SETTLEMENT_CSV_HEADER", "SettlementBook", "SettlementLine", "settlement_csv"]


@dataclass(frozen=True, slots=True)
class SettlementLine:
    day: date
    reference: str
    psp_reference: str
    amount: int
    currency: str
    fee: int
    net: int
    status: str


class SettlementBook:
    """The settlement lines of one simulated processor, at most `lines_max` of them."""

    def __init__(self, lines_max: int, clock: Callable[[], float]) -> None:
        self.lines_max = lines_max
        self._clock = clock
        self._lines: list[SettlementLine] = []

    def has_room(self) -> bool:
        return len(self._lines) < self.lines_max

    def settle(
        self, *, reference: str, psp_reference: str, currency: str, amount: int, fee: int, status: str
    ) -> None:
        """Books one line dated today (by the simulator's clock); the caller checked `has_room()`."""
        day = datetime.fromtimestamp(self._clock(), UTC).date()
        self._lines.append(
            SettlementLine(
                day=day,
                reference=reference,
                psp_reference=psp_reference,
                amount=amount,
                currency=currency,
                fee=fee,
                net=amount - fee,
                status=status,
            )
        )

    def lines(self) -> list[SettlementLine]:
        return list(self._lines)

    def csv(self, day: date) -> str:
        return settlement_csv(self._lines, day)


def settlement_csv(lines: Iterable[SettlementLine], day: date) -> str:
    """The settlement file of `day` from settlement lines (header first, lines in their order)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SETTLEMENT_CSV_HEADER)
    for line in lines:
        if line.day == day:
            writer.writerow((line.reference, line.amount, line.currency, line.fee, line.net, line.status))
    return out.getvalue()
