"""The simulated PSP: an in-process, asyncio model of a card processor.

It behaves like the processors the gateway talks to in production, on purpose including the
awkward parts: latency with a tail, a capacity limit with errors rising before it, spontaneous
errors, and responses that get lost after the charge happened. Every random choice is drawn from a
hash of (seed, operation, idempotency key, call sequence), so a run replays exactly from its seed
when calls arrive in the same order.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from .profiles import PSPProfile
from .tokens import TokenBehaviour, behaviour_of

IDEMPOTENCY_KEY_LENGTH_MAX = 255
REFERENCE_LENGTH_MAX = 255
TOKEN_LENGTH_MAX = 64
AMOUNT_MINOR_MAX = 10**12
TRANSACTIONS_MAX_DEFAULT = 100_000
SETTLEMENT_CSV_HEADER = ("reference", "amount", "currency", "fee", "net", "status")

_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")


class ResponseLost(Exception):
    """The PSP processed the request but the caller never gets the answer (it sees a timeout)."""

    def __init__(self, psp: str, operation: str, idempotency_key: str) -> None:
        super().__init__(f"{psp}: response to {operation} (key {idempotency_key!r}) was lost")
        self.psp = psp
        self.operation = operation
        self.idempotency_key = idempotency_key


@dataclass(frozen=True, slots=True)
class SimResponse:
    """The answer to one operation.

    `outcome` is one of approved, soft_decline, hard_decline, error. Errors carry `retryable`:
    true when the request was not processed and may be sent again (capacity, outage), false when
    the request itself is invalid for the transaction's state.
    """

    outcome: str
    psp: str
    operation: str
    code: str | None = None
    message: str | None = None
    retryable: bool = False
    psp_reference: str | None = None
    reference: str | None = None
    status: str | None = None
    amount: int = 0
    currency: str | None = None
    fee_minor: int = 0


@dataclass(frozen=True, slots=True)
class TransactionStatus:
    """Snapshot of a transaction as the PSP sees it, returned by status queries."""

    psp: str
    psp_reference: str
    reference: str
    status: str
    currency: str
    amount_authorized: int
    amount_captured: int
    amount_refunded: int
    capture_final: bool
    decline_code: str | None
    created_at: float


@dataclass(slots=True)
class _Transaction:
    psp_reference: str
    reference: str
    token_behaviour: TokenBehaviour
    currency: str
    amount_requested: int
    status: str
    decline_code: str | None
    amount_authorized: int
    amount_captured: int
    amount_refunded: int
    capture_final: bool
    created_at: float


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


class SimulatedPSP:
    """One simulated processor with its own profile, transactions and settlement lines.

    `time_scale` multiplies every simulated duration (0.01 makes a 220 ms call take 2.2 ms).
    `transactions_max` bounds memory: at the limit new authorizations are refused with the
    non-retryable error `simulator_storage_full`; stored idempotency results and settlement lines
    are bounded by `operations_max` (default four per transaction) the same way.
    """

    def __init__(
        self,
        profile: PSPProfile,
        *,
        seed: int = 0,
        time_scale: float = 1.0,
        transactions_max: int = TRANSACTIONS_MAX_DEFAULT,
        operations_max: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        assert time_scale >= 0.0
        assert transactions_max >= 1
        self.profile = profile
        self.seed = seed
        self.time_scale = time_scale
        self.transactions_max = transactions_max
        self.operations_max = operations_max if operations_max is not None else 4 * transactions_max
        self._clock = clock
        self._sleep = sleep
        self._sequence = 0
        self._inflight = 0
        self._transactions: dict[str, _Transaction] = {}
        self._by_reference: dict[str, list[str]] = {}
        # (operation, key) -> (fingerprint, response, psp_reference); None while in progress.
        self._results: dict[tuple[str, str], tuple[tuple[object, ...], SimResponse] | None] = {}
        self._key_to_psp_reference: dict[str, str] = {}
        self._errored_references: set[str] = set()
        self._settlement: list[SettlementLine] = []

    # -- introspection --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def transaction_count(self) -> int:
        return len(self._transactions)

    def settlement_lines(self) -> list[SettlementLine]:
        return list(self._settlement)

    # -- randomness and time --------------------------------------------------------------------

    def _unit(self, *parts: object) -> float:
        """A uniform draw in [0, 1) determined by the seed and `parts`."""
        digest = hashlib.blake2b(
            repr((self.seed, self.profile.name, *parts)).encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2**64

    def latency_ms(self, operation: str, key: str, sequence: int) -> float:
        p = self.profile
        latency = (
            p.latency_ms_base
            + (2.0 * self._unit("jitter", operation, key, sequence) - 1.0) * p.latency_ms_jitter
        )
        if self._unit("tail", operation, key, sequence) < p.latency_tail_rate:
            latency *= p.latency_tail_factor
        return max(0.0, latency)

    async def _wait_ms(self, duration_ms: float) -> None:
        await self._sleep(duration_ms * self.time_scale / 1000.0)

    # -- the request pipeline shared by every operation ------------------------------------------

    def _error(self, operation: str, code: str, message: str, *, retryable: bool) -> SimResponse:
        return SimResponse(
            outcome="error",
            psp=self.name,
            operation=operation,
            code=code,
            message=message,
            retryable=retryable,
        )

    async def _call(
        self,
        operation: str,
        key: str,
        fingerprint: tuple[object, ...],
        process: Callable[[], tuple[SimResponse, bool] | SimResponse],
        force_error: str | None = None,
    ) -> SimResponse:
        if not key or len(key) > IDEMPOTENCY_KEY_LENGTH_MAX:
            return self._error(
                operation, "invalid_request", "idempotency key must be 1..255 characters", retryable=False
            )
        self._sequence += 1
        sequence = self._sequence
        slot = (operation, key)
        if slot in self._results:
            stored = self._results[slot]
            if stored is None:
                return self._error(
                    operation, "request_in_progress", "a request with this key is in flight", retryable=True
                )
            stored_fingerprint, stored_response = stored
            if stored_fingerprint != fingerprint:
                return self._error(
                    operation,
                    "idempotency_key_reused",
                    "this idempotency key was used with different parameters",
                    retryable=False,
                )
            await self._wait_ms(self.latency_ms(operation, key, sequence))
            return stored_response

        p = self.profile
        if self._inflight + 1 > p.capacity_inflight_max:
            # Rejected at the door: no latency, nothing processed.
            return self._error(
                operation,
                "capacity_exceeded",
                f"{self.name} is at capacity ({p.capacity_inflight_max} requests in flight)",
                retryable=True,
            )
        if len(self._results) >= self.operations_max:
            return self._error(
                operation,
                "simulator_storage_full",
                f"simulator stored-operations limit reached (operations_max={self.operations_max}); "
                "restart the simulator or raise the limit",
                retryable=False,
            )
        self._inflight += 1
        self._results[slot] = None
        utilisation = self._inflight / p.capacity_inflight_max
        stored_result = False
        try:
            await self._wait_ms(self.latency_ms(operation, key, sequence))
            if utilisation > p.overload_utilisation_threshold:
                over = (utilisation - p.overload_utilisation_threshold) / (
                    1.0 - p.overload_utilisation_threshold
                )
                if self._unit("overload", operation, key, sequence) < over * p.overload_error_rate_max:
                    return self._error(
                        operation,
                        "processor_overloaded",
                        f"{self.name} is overloaded ({utilisation:.0%} of capacity)",
                        retryable=True,
                    )
            if force_error is not None:
                return self._error(
                    operation, force_error, f"{self.name} could not process the request", retryable=True
                )
            if self._unit("error", operation, key, sequence) < p.error_rate:
                return self._error(
                    operation, "processor_error", f"{self.name} failed to process the request", retryable=True
                )
            result = process()
            response, lost = result if isinstance(result, tuple) else (result, False)
            if response.outcome == "error" and response.retryable:
                return response
            self._results[slot] = (fingerprint, response)
            stored_result = True
            if response.psp_reference is not None:
                self._key_to_psp_reference[key] = response.psp_reference
            if lost or self._unit("timeout", operation, key, sequence) < p.timeout_rate:
                await self._wait_ms(p.timeout_hang_ms)
                raise ResponseLost(self.name, operation, key)
            return response
        finally:
            self._inflight -= 1
            if not stored_result:
                del self._results[slot]

    # -- operations ----------------------------------------------------------------------------

    async def authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> SimResponse:
        op = "authorize"
        invalid = _validate_amount(amount) or _validate_currency(currency)
        if not reference or len(reference) > REFERENCE_LENGTH_MAX:
            invalid = "reference must be 1..255 characters"
        if not token or len(token) > TOKEN_LENGTH_MAX:
            invalid = "token must be 1..64 characters"
        if invalid:
            return self._error(op, "invalid_request", invalid, retryable=False)
        spec = behaviour_of(token)
        force_error: str | None = None
        if spec.behaviour is TokenBehaviour.ERROR:
            force_error = spec.code
        elif (
            spec.behaviour is TokenBehaviour.ERROR_ONCE
            and reference not in self._errored_references
            and len(self._errored_references) < self.operations_max
        ):
            self._errored_references.add(reference)
            force_error = spec.code

        def process() -> tuple[SimResponse, bool] | SimResponse:
            if len(self._transactions) >= self.transactions_max:
                return self._error(
                    op,
                    "simulator_storage_full",
                    f"simulator stored-transactions limit reached (transactions_max={self.transactions_max}); "
                    "restart the simulator or raise the limit",
                    retryable=False,
                )
            psp_reference = f"{self.name}_{len(self._transactions) + 1:09d}"
            declined = spec.behaviour in (
                TokenBehaviour.SOFT_DECLINE,
                TokenBehaviour.HARD_DECLINE,
                TokenBehaviour.TIMEOUT_DECLINED,
            )
            txn = _Transaction(
                psp_reference=psp_reference,
                reference=reference,
                token_behaviour=spec.behaviour,
                currency=currency,
                amount_requested=amount,
                status="declined" if declined else "authorized",
                decline_code=spec.code if declined else None,
                amount_authorized=0 if declined else amount,
                amount_captured=0,
                amount_refunded=0,
                capture_final=declined,
                created_at=self._clock(),
            )
            self._transactions[psp_reference] = txn
            self._by_reference.setdefault(reference, []).append(psp_reference)
            if spec.behaviour is TokenBehaviour.HARD_DECLINE:
                outcome = "hard_decline"
            elif declined:
                outcome = "soft_decline"
            else:
                outcome = "approved"
            response = self._txn_response(
                op, outcome, txn, amount=txn.amount_authorized, code=txn.decline_code
            )
            lost = spec.behaviour in (TokenBehaviour.TIMEOUT_APPROVED, TokenBehaviour.TIMEOUT_DECLINED)
            return response, lost

        return await self._call(
            op, idempotency_key, (reference, amount, currency, token), process, force_error
        )

    async def capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> SimResponse:
        op = "capture"
        invalid = _validate_amount(amount)
        if invalid:
            return self._error(op, "invalid_request", invalid, retryable=False)

        def process() -> tuple[SimResponse, bool] | SimResponse:
            txn = self._transactions.get(psp_reference)
            if txn is None:
                return self._error(
                    op, "no_such_transaction", f"unknown transaction {psp_reference}", retryable=False
                )
            if txn.status not in ("authorized", "captured") or txn.capture_final:
                return self._error(op, "invalid_state", f"transaction is {txn.status}", retryable=False)
            capturable = txn.amount_authorized - txn.amount_captured
            if amount > capturable:
                return self._error(
                    op, "amount_exceeds_capturable", f"at most {capturable} can be captured", retryable=False
                )
            if not self._settlement_room():
                return self._storage_full(op)
            txn.amount_captured += amount
            txn.capture_final = final or txn.amount_captured == txn.amount_authorized
            txn.status = "captured"
            fee = self.profile.fee_minor(amount)
            self._settle(txn, amount, fee, "captured")
            response = self._txn_response(op, "approved", txn, amount=amount, fee_minor=fee)
            return response, txn.token_behaviour is TokenBehaviour.TIMEOUT_ON_CAPTURE

        return await self._call(op, idempotency_key, (psp_reference, amount, final), process)

    async def void(self, *, psp_reference: str, idempotency_key: str) -> SimResponse:
        op = "void"

        def process() -> SimResponse:
            txn = self._transactions.get(psp_reference)
            if txn is None:
                return self._error(
                    op, "no_such_transaction", f"unknown transaction {psp_reference}", retryable=False
                )
            if txn.status != "authorized":
                return self._error(op, "invalid_state", f"transaction is {txn.status}", retryable=False)
            released = txn.amount_authorized
            txn.status = "voided"
            txn.capture_final = True
            return self._txn_response(op, "approved", txn, amount=released)

        return await self._call(op, idempotency_key, (psp_reference,), process)

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> SimResponse:
        op = "refund"
        invalid = _validate_amount(amount)
        if invalid:
            return self._error(op, "invalid_request", invalid, retryable=False)

        def process() -> tuple[SimResponse, bool] | SimResponse:
            txn = self._transactions.get(psp_reference)
            if txn is None:
                return self._error(
                    op, "no_such_transaction", f"unknown transaction {psp_reference}", retryable=False
                )
            if txn.status not in ("captured", "partially_refunded"):
                return self._error(op, "invalid_state", f"transaction is {txn.status}", retryable=False)
            refundable = txn.amount_captured - txn.amount_refunded
            if amount > refundable:
                return self._error(
                    op, "amount_exceeds_refundable", f"at most {refundable} can be refunded", retryable=False
                )
            if not self._settlement_room():
                return self._storage_full(op)
            txn.amount_refunded += amount
            # The first refund closes capturing: any uncaptured remainder of the hold is released.
            txn.capture_final = True
            txn.status = "refunded" if txn.amount_refunded == txn.amount_captured else "partially_refunded"
            self._settle(txn, -amount, 0, "refunded")
            response = self._txn_response(op, "approved", txn, amount=amount)
            return response, txn.token_behaviour is TokenBehaviour.TIMEOUT_ON_REFUND

        return await self._call(op, idempotency_key, (psp_reference, amount), process)

    async def status(
        self,
        *,
        reference: str | None = None,
        psp_reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> TransactionStatus | None:
        """The truth about a transaction, found by our reference, the PSP's, or any operation's key.

        By `reference` the most recent authorization for it is returned. Status queries take the
        profile's latency but never time out and are not subject to token behaviours.
        """
        self._sequence += 1
        await self._wait_ms(
            self.latency_ms("status", str((reference, psp_reference, idempotency_key)), self._sequence)
        )
        ref = psp_reference
        if ref is None and idempotency_key is not None:
            ref = self._key_to_psp_reference.get(idempotency_key)
        if ref is None and reference is not None:
            refs = self._by_reference.get(reference)
            ref = refs[-1] if refs else None
        txn = self._transactions.get(ref) if ref is not None else None
        if txn is None:
            return None
        return TransactionStatus(
            psp=self.name,
            psp_reference=txn.psp_reference,
            reference=txn.reference,
            status=txn.status,
            currency=txn.currency,
            amount_authorized=txn.amount_authorized,
            amount_captured=txn.amount_captured,
            amount_refunded=txn.amount_refunded,
            capture_final=txn.capture_final,
            decline_code=txn.decline_code,
            created_at=txn.created_at,
        )

    # -- settlement ------------------------------------------------------------------------------

    def _settlement_room(self) -> bool:
        return len(self._settlement) < self.operations_max

    def _storage_full(self, op: str) -> SimResponse:
        return self._error(
            op,
            "simulator_storage_full",
            f"simulator settlement-lines limit reached (operations_max={self.operations_max})",
            retryable=False,
        )

    def _settle(self, txn: _Transaction, amount: int, fee: int, status: str) -> None:
        day = datetime.fromtimestamp(self._clock(), UTC).date()
        self._settlement.append(
            SettlementLine(
                day=day,
                reference=txn.reference,
                psp_reference=txn.psp_reference,
                amount=amount,
                currency=txn.currency,
                fee=fee,
                net=amount - fee,
                status=status,
            )
        )

    def settlement_csv(self, day: date) -> str:
        """The daily settlement file: one line per capture (fee charged) and per refund (negative).

        Columns: reference (our payment reference), amount, currency, fee, net, status; amounts in
        minor units; lines in processing order.
        """
        return settlement_csv(self._settlement, day)

    def _txn_response(
        self,
        op: str,
        outcome: str,
        txn: _Transaction,
        *,
        amount: int,
        code: str | None = None,
        fee_minor: int = 0,
    ) -> SimResponse:
        return SimResponse(
            outcome=outcome,
            psp=self.name,
            operation=op,
            code=code,
            psp_reference=txn.psp_reference,
            reference=txn.reference,
            status=txn.status,
            amount=amount,
            currency=txn.currency,
            fee_minor=fee_minor,
        )


def settlement_csv(lines: Iterable[SettlementLine], day: date) -> str:
    """The settlement file of `day` from settlement lines (header first, lines in their order)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SETTLEMENT_CSV_HEADER)
    for line in lines:
        if line.day == day:
            writer.writerow((line.reference, line.amount, line.currency, line.fee, line.net, line.status))
    return out.getvalue()


def _validate_amount(amount: int) -> str | None:
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= AMOUNT_MINOR_MAX:
        return f"amount must be an integer in 1..{AMOUNT_MINOR_MAX} minor units"
    return None


def _validate_currency(currency: str) -> str | None:
    if not isinstance(currency, str) or not _CURRENCY_RE.match(currency):
        return "currency must be a three-letter upper-case ISO 4217 code"
    return None
