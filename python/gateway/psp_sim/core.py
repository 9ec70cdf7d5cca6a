"""The simulated PSP: an in-process, asyncio model of a card processor.

It behaves like the processors the gateway talks to in production, on purpose including the
awkward parts: latency with a tail, a capacity limit with errors rising before it, spontaneous
errors, and responses that get lost after the charge happened. Every random choice is drawn from a
hash of (seed, operation, idempotency key, call sequence), so a run replays exactly from its seed
when calls arrive in the same order.

Here: the operations, over the request pipeline every operation shares (idempotency by key and
fingerprint, capacity, latency, injected faults, lost responses: pipeline.py). What a transaction
allows is transactions.py, the settlement lines settlement.py; the answers are the wire types
(psp/wire.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

from gateway.psp.wire import Response as SimResponse
from gateway.psp.wire import TransactionStatus

from .pipeline import Done, Pipeline, Process, ResponseLost
from .profiles import PSPProfile
from .settlement import SETTLEMENT_CSV_HEADER, SettlementBook, SettlementLine
from .tokens import TokenBehaviour, behaviour_of
from .transactions import Refusal, Transaction, authorize_invalid, validate_amount

# The simulator's answers are the wire types (psp/wire.py), so what it returns in process is what it
# sends over HTTP; `SimResponse` is the simulator's name for `Response`.
__all__ = [
    "SETTLEMENT_CSV_HEADER",
    "TRANSACTIONS_MAX_DEFAULT",
    "ResponseLost",
    "SettlementLine",
    "SimResponse",
    "SimulatedPSP",
    "TransactionStatus",
]

TRANSACTIONS_MAX_DEFAULT = 100_000
# The operations that move money: their settlement line's status and the sign of its amount, whether
# they charge a fee, and the token behaviour that loses their response.
_SETTLES = {
    "capture": ("captured", 1, True, TokenBehaviour.TIMEOUT_ON_CAPTURE),
    "refund": ("refunded", -1, False, TokenBehaviour.TIMEOUT_ON_REFUND),
}


class SimulatedPSP(Pipeline):
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
        if time_scale < 0.0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        if transactions_max < 1:
            raise ValueError(f"transactions_max must be >= 1, got {transactions_max}")
        self.profile = profile
        self.seed = seed
        self.time_scale = time_scale
        self.transactions_max = transactions_max
        self.operations_max = operations_max if operations_max is not None else 4 * transactions_max
        self._clock = clock
        self._sleep = sleep
        self._sequence = 0
        self._inflight = 0
        self._transactions: dict[str, Transaction] = {}
        self._by_reference: dict[str, list[str]] = {}
        self._results = {}
        self._key_to_psp_reference = {}
        self._errored_references: set[str] = set()
        self._settlement = SettlementBook(self.operations_max, clock)
        # A real PSP never hands out a reference twice. This simulator lives in a process that may be
        # restarted (the embedded worker child is respawned), so its references carry the instant it
        # started: a restarted simulator cannot give a new transaction a reference an old one had.
        self._epoch = _base36(int(clock() * 1000))
        self._draws = hashlib.blake2b(repr((seed, profile.name))[:-1].encode() + b", ", digest_size=8)

    # -- introspection --------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def transaction_count(self) -> int:
        return len(self._transactions)

    def settlement_lines(self) -> list[SettlementLine]:
        return self._settlement.lines()

    # -- operations ----------------------------------------------------------------------------

    def _refused(self, op: str, refusal: Refusal) -> SimResponse:
        return self._error(op, refusal[0], refusal[1], retryable=False)

    def _unknown(self, op: str, psp_reference: str) -> SimResponse:
        return self._error(op, "no_such_transaction", f"unknown transaction {psp_reference}", retryable=False)

    async def authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> SimResponse:
        request = self._authorization(reference, amount, currency, token)
        if isinstance(request, SimResponse):
            return request
        return await self._call("authorize", idempotency_key, *request)

    def submit_authorize(
        self, call: asyncio.Future[Any], done: Done, *, reference: str, amount: int, currency: str, token: str,
        idempotency_key: str,
    ) -> None:
        """`authorize` through `_submit` (only where `answers_at_once`)."""
        request = self._authorization(reference, amount, currency, token)
        if isinstance(request, SimResponse):
            done(request)
        else:
            self._submit(call, done, "authorize", idempotency_key, *request)

    def _authorization(
        self, reference: str, amount: int, currency: str, token: str
    ) -> SimResponse | tuple[tuple[object, ...], Process, str | None]:
        """An authorization before its key is looked at: refused at once, or its fingerprint, what it
        does once admitted and the error its token forces."""
        op = "authorize"
        invalid = authorize_invalid(reference, amount, currency, token)
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
                return self._storage_full(op, "stored-transactions", f"transactions_max={self.transactions_max}")
            psp_reference = f"{self.name}_{self._epoch}_{len(self._transactions) + 1:09d}"
            txn = Transaction.authorized(
                psp_reference, reference, spec.behaviour, spec.code, currency, amount, self._clock()
            )
            self._transactions[psp_reference] = txn
            self._by_reference.setdefault(reference, []).append(psp_reference)
            response = txn.response(
                self.name, op, txn.outcome(), amount=txn.amount_authorized, code=txn.decline_code
            )
            lost = spec.behaviour in (TokenBehaviour.TIMEOUT_APPROVED, TokenBehaviour.TIMEOUT_DECLINED)
            return response, lost

        return (reference, amount, currency, token), process, force_error

    async def capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> SimResponse:
        process = self._capturing(psp_reference, amount, final)
        if isinstance(process, SimResponse):
            return process
        return await self._call("capture", idempotency_key, (psp_reference, amount, final), process)

    def submit_capture(
        self, call: asyncio.Future[Any], done: Done, *, psp_reference: str, amount: int, idempotency_key: str,
        final: bool = False,
    ) -> None:
        """`capture` through `_submit` (only where `answers_at_once`)."""
        process = self._capturing(psp_reference, amount, final)
        if isinstance(process, SimResponse):
            done(process)
        else:
            self._submit(call, done, "capture", idempotency_key, (psp_reference, amount, final), process)

    def _capturing(self, psp_reference: str, amount: int, final: bool) -> SimResponse | Process:
        return self._settling(
            "capture", psp_reference, amount,
            lambda txn: txn.capture_refusal(amount), lambda txn: txn.capture(amount, final),
        )

    async def void(self, *, psp_reference: str, idempotency_key: str) -> SimResponse:
        op = "void"

        def process() -> SimResponse:
            txn = self._transactions.get(psp_reference)
            if txn is None:
                return self._unknown(op, psp_reference)
            refusal = txn.void_refusal()
            if refusal is not None:
                return self._refused(op, refusal)
            released = txn.void()
            return txn.response(self.name, op, "approved", amount=released)

        return await self._call(op, idempotency_key, (psp_reference,), process)

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> SimResponse:
        process = self._settling(
            "refund", psp_reference, amount,
            lambda txn: txn.refund_refusal(amount), lambda txn: txn.refund(amount),
        )
        if isinstance(process, SimResponse):
            return process
        return await self._call("refund", idempotency_key, (psp_reference, amount), process)

    def _settling(
        self,
        op: str,
        psp_reference: str,
        amount: int,
        refusal_of: Callable[[Transaction], Refusal | None],
        apply: Callable[[Transaction], None],
    ) -> SimResponse | Process:
        """A capture or a refund: the amount checked (else refused at once), then once admitted the
        transaction asked (`refusal_of`) and changed (`apply`), and a settlement line written (see
        `_SETTLES`)."""
        invalid = validate_amount(amount)
        if invalid:
            return self._error(op, "invalid_request", invalid, retryable=False)
        settled, sign, charges_fee, lost_on = _SETTLES[op]

        def process() -> tuple[SimResponse, bool] | SimResponse:
            txn = self._transactions.get(psp_reference)
            if txn is None:
                return self._unknown(op, psp_reference)
            refusal = refusal_of(txn)
            if refusal is not None:
                return self._refused(op, refusal)
            if not self._settlement.has_room():
                return self._storage_full(op, "settlement-lines", f"operations_max={self.operations_max}", advice="")
            apply(txn)
            fee = self.profile.fee_minor(amount) if charges_fee else 0
            self._settle(txn, sign * amount, fee, settled)
            response = txn.response(self.name, op, "approved", amount=amount, fee_minor=fee)
            return response, txn.token_behaviour is lost_on

        return process

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
        return txn.snapshot(self.name) if txn is not None else None

    # -- settlement ------------------------------------------------------------------------------

    def _settle(self, txn: Transaction, amount: int, fee: int, status: str) -> None:
        self._settlement.settle(
            reference=txn.reference,
            psp_reference=txn.psp_reference,
            currency=txn.currency,
            amount=amount,
            fee=fee,
            status=status,
        )

    def settlement_csv(self, day: date) -> str:
        """The daily settlement file: one line per capture (fee charged) and per refund (negative).

        Columns: reference (our payment reference), amount, currency, fee, net, status; amounts in
        minor units; lines in processing order.
        """
        return self._settlement.csv(day)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out
