"""The simulated PSP: an in-process, asyncio model of a card processor.

It behaves like the processors the gateway talks to in production, on purpose including the
awkward parts: latency with a tail, a capacity limit with errors rising before it, spontaneous
errors, and responses that get lost after the charge happened. Every random choice is drawn from a
hash of (seed, operation, idempotency key, call sequence), so a run replays exactly from its seed
when calls arrive in the same order.

Here: the request pipeline every operation shares (idempotency by key and fingerprint, capacity,
latency, injected faults, lost responses) and the operations. What a transaction allows is
transactions.py, the settlement lines settlement.py; the answers are the wire types (psp/wire.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import date

from gateway.psp.wire import Response as SimResponse
from gateway.psp.wire import TransactionStatus

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

IDEMPOTENCY_KEY_LENGTH_MAX = 255
TRANSACTIONS_MAX_DEFAULT = 100_000
_RESTART_ADVICE = "; restart the simulator or raise the limit"
# The operations that move money: their settlement line's status and the sign of its amount, whether
# they charge a fee, and the token behaviour that loses their response.
_SETTLES = {
    "capture": ("captured", 1, True, TokenBehaviour.TIMEOUT_ON_CAPTURE),
    "refund": ("refunded", -1, False, TokenBehaviour.TIMEOUT_ON_REFUND),
}


class ResponseLost(Exception):
    """The PSP processed the request but the caller never gets the answer (it sees a timeout)."""

    def __init__(self, psp: str, operation: str, idempotency_key: str) -> None:
        super().__init__(f"{psp}: response to {operation} (key {idempotency_key!r}) was lost")
        self.psp = psp
        self.operation = operation
        self.idempotency_key = idempotency_key


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
        # (operation, key) -> (fingerprint, response, psp_reference); None while in progress.
        self._results: dict[tuple[str, str], tuple[tuple[object, ...], SimResponse] | None] = {}
        self._key_to_psp_reference: dict[str, str] = {}
        self._errored_references: set[str] = set()
        self._settlement = SettlementBook(self.operations_max, clock)
        # A real PSP never hands out a reference twice. This simulator lives in a process that may be
        # restarted (the embedded worker child is respawned), so its references carry the instant it
        # started: a restarted simulator cannot give a new transaction a reference an old one had.
        self._epoch = _base36(int(clock() * 1000))

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
        return self._settlement.lines()

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

    async def _wait_latency(self, operation: str, key: str, sequence: int) -> None:
        """The call's latency; at time scale 0 only a turn of the event loop (its draws would be
        multiplied by 0: they are skipped, which changes no other draw)."""
        await self._sleep(self.latency_ms(operation, key, sequence) * self.time_scale / 1000.0 if self.time_scale
                          else 0.0)

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
            await self._wait_latency(operation, key, sequence)
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
            return self._storage_full(operation, "stored-operations", f"operations_max={self.operations_max}")
        self._inflight += 1
        self._results[slot] = None
        utilisation = self._inflight / p.capacity_inflight_max
        stored_result = False
        try:
            await self._wait_latency(operation, key, sequence)
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

    def _refused(self, op: str, refusal: Refusal) -> SimResponse:
        return self._error(op, refusal[0], refusal[1], retryable=False)

    def _unknown(self, op: str, psp_reference: str) -> SimResponse:
        return self._error(op, "no_such_transaction", f"unknown transaction {psp_reference}", retryable=False)

    async def authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> SimResponse:
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

        return await self._call(
            op, idempotency_key, (reference, amount, currency, token), process, force_error
        )

    async def capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> SimResponse:
        return await self._settling(
            "capture", idempotency_key, (psp_reference, amount, final), psp_reference, amount,
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
        return await self._settling(
            "refund", idempotency_key, (psp_reference, amount), psp_reference, amount,
            lambda txn: txn.refund_refusal(amount), lambda txn: txn.refund(amount),
        )

    async def _settling(
        self,
        op: str,
        key: str,
        fingerprint: tuple[object, ...],
        psp_reference: str,
        amount: int,
        refusal_of: Callable[[Transaction], Refusal | None],
        apply: Callable[[Transaction], None],
    ) -> SimResponse:
        """A capture or a refund: the amount checked, the transaction asked (`refusal_of`) and changed
        (`apply`), and a settlement line written (see `_SETTLES`)."""
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

        return await self._call(op, key, fingerprint, process)

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

    def _storage_full(self, op: str, stored: str, limit: str, advice: str = _RESTART_ADVICE) -> SimResponse:
        """The limit on what the simulator stores (`limit`: name=value) is reached: a non-retryable error."""
        message = f"simulator {stored} limit reached ({limit}){advice}"
        return self._error(op, "simulator_storage_full", message, retryable=False)

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
