"""One simulated transaction and the rules of its life: what a processor allows after an authorization.

Pure state, no time and no randomness (those are core.py's): the simulator looks a transaction up,
asks it whether an operation is allowed (`*_refusal`: an error code and message, or None), and only
then applies it. Invariants, kept by every method: refunded <= captured <= authorized; once
`capture_final` is set nothing more is captured (a final capture, a full capture, a void, a first
refund or a decline set it); a declined transaction authorizes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.psp.wire import Response, TransactionStatus

from .tokens import TokenBehaviour

REFERENCE_LENGTH_MAX = 255
TOKEN_LENGTH_MAX = 64
AMOUNT_MINOR_MAX = 10**12

_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_DECLINES = (TokenBehaviour.SOFT_DECLINE, TokenBehaviour.HARD_DECLINE, TokenBehaviour.TIMEOUT_DECLINED)

Refusal = tuple[str, str]


@dataclass(slots=True)
class Transaction:
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

    @classmethod
    def authorized(
        cls,
        psp_reference: str,
        reference: str,
        behaviour: TokenBehaviour,
        code: str | None,
        currency: str,
        amount: int,
        created_at: float,
    ) -> Transaction:
        """A new authorization, declined when the token's behaviour says so."""
        declined = behaviour in _DECLINES
        return cls(
            psp_reference=psp_reference,
            reference=reference,
            token_behaviour=behaviour,
            currency=currency,
            amount_requested=amount,
            status="declined" if declined else "authorized",
            decline_code=code if declined else None,
            amount_authorized=0 if declined else amount,
            amount_captured=0,
            amount_refunded=0,
            capture_final=declined,
            created_at=created_at,
        )

    def outcome(self) -> str:
        """The outcome of the authorization that created this transaction."""
        if self.token_behaviour is TokenBehaviour.HARD_DECLINE:
            return "hard_decline"
        return "soft_decline" if self.token_behaviour in _DECLINES else "approved"

    def capture_refusal(self, amount: int) -> Refusal | None:
        if self.status not in ("authorized", "captured") or self.capture_final:
            return "invalid_state", f"transaction is {self.status}"
        capturable = self.amount_authorized - self.amount_captured
        if amount > capturable:
            return "amount_exceeds_capturable", f"at most {capturable} can be captured"
        return None

    def capture(self, amount: int, final: bool) -> None:
        self.amount_captured += amount
        self.capture_final = final or self.amount_captured == self.amount_authorized
        self.status = "captured"

    def void_refusal(self) -> Refusal | None:
        return None if self.status == "authorized" else ("invalid_state", f"transaction is {self.status}")

    def void(self) -> int:
        """Voids the authorization; returns the amount released."""
        self.status = "voided"
        self.capture_final = True
        return self.amount_authorized

    def refund_refusal(self, amount: int) -> Refusal | None:
        if self.status not in ("captured", "partially_refunded"):
            return "invalid_state", f"transaction is {self.status}"
        refundable = self.amount_captured - self.amount_refunded
        if amount > refundable:
            return "amount_exceeds_refundable", f"at most {refundable} can be refunded"
        return None

    def refund(self, amount: int) -> None:
        self.amount_refunded += amount
        # The first refund closes capturing: any uncaptured remainder of the hold is released.
        self.capture_final = True
        self.status = "refunded" if self.amount_refunded == self.amount_captured else "partially_refunded"

    def response(
        self, psp: str, op: str, outcome: str, *, amount: int, code: str | None = None, fee_minor: int = 0
    ) -> Response:
        return Response(
            outcome=outcome,
            psp=psp,
            operation=op,
            code=code,
            psp_reference=self.psp_reference,
            reference=self.reference,
            status=self.status,
            amount=amount,
            currency=self.currency,
            fee_minor=fee_minor,
        )

    def snapshot(self, psp: str) -> TransactionStatus:
        return TransactionStatus(
            psp=psp,
            psp_reference=self.psp_reference,
            reference=self.reference,
            status=self.status,
            currency=self.currency,
            amount_authorized=self.amount_authorized,
            amount_captured=self.amount_captured,
            amount_refunded=self.amount_refunded,
            capture_final=self.capture_final,
            decline_code=self.decline_code,
            created_at=self.created_at,
        )


def authorize_invalid(reference: str, amount: int, currency: str, token: str) -> str | None:
    """Why an authorization request is invalid (the last rule broken wins), None when it is valid."""
    invalid = validate_amount(amount) or validate_currency(currency)
    if not reference or len(reference) > REFERENCE_LENGTH_MAX:
        invalid = "reference must be 1..255 characters"
    if not token or len(token) > TOKEN_LENGTH_MAX:
        invalid = "token must be 1..64 characters"
    return invalid


def validate_amount(amount: int) -> str | None:
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= AMOUNT_MINOR_MAX:
        return f"amount must be an integer in 1..{AMOUNT_MINOR_MAX} minor units"
    return None


def validate_currency(currency: str) -> str | None:
    if not isinstance(currency, str) or not _CURRENCY_RE.match(currency):
        return "currency must be a three-letter upper-case ISO 4217 code"
    return None
