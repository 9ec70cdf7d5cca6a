"""Test payment-method tokens that make the simulator behave in a chosen way.

Any token not in this table is approved. The table is documented in docs/psp.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TokenBehaviour(StrEnum):
    APPROVE = "approve"
    SOFT_DECLINE = "soft_decline"
    HARD_DECLINE = "hard_decline"
    # The authorization is processed (approved) but the response is lost: the caller times out
    # and only a status query shows the truth.
    TIMEOUT_APPROVED = "timeout_approved"
    # Same, but the processed authorization was declined.
    TIMEOUT_DECLINED = "timeout_declined"
    # The PSP fails without processing the request (retryable).
    ERROR = "error"
    # The first authorization for a reference fails (retryable), later ones succeed.
    ERROR_ONCE = "error_once"
    # Authorization succeeds; every capture of it is processed but its response is lost.
    TIMEOUT_ON_CAPTURE = "timeout_on_capture"
    # Authorization succeeds; every refund of it is processed but its response is lost.
    TIMEOUT_ON_REFUND = "timeout_on_refund"


@dataclass(frozen=True, slots=True)
class TokenSpec:
    token: str
    behaviour: TokenBehaviour
    code: str | None
    description: str


TEST_TOKENS: dict[str, TokenSpec] = {
    t.token: t
    for t in (
        TokenSpec(
            "tok_visa", TokenBehaviour.APPROVE, None, "Approved (any unlisted token behaves the same)."
        ),
        TokenSpec("tok_mastercard", TokenBehaviour.APPROVE, None, "Approved."),
        TokenSpec(
            "tok_decline_insufficient_funds",
            TokenBehaviour.SOFT_DECLINE,
            "insufficient_funds",
            "Soft decline: may succeed if retried later.",
        ),
        TokenSpec(
            "tok_decline_do_not_honor",
            TokenBehaviour.SOFT_DECLINE,
            "do_not_honor",
            "Soft decline: generic issuer refusal.",
        ),
        TokenSpec(
            "tok_decline_stolen",
            TokenBehaviour.HARD_DECLINE,
            "stolen_card",
            "Hard decline: never retry.",
        ),
        TokenSpec("tok_decline_lost", TokenBehaviour.HARD_DECLINE, "lost_card", "Hard decline: never retry."),
        TokenSpec("tok_decline_generic", TokenBehaviour.HARD_DECLINE, "generic_decline", "Hard decline, no reason given."),
        TokenSpec("tok_decline_fraudulent", TokenBehaviour.HARD_DECLINE, "fraudulent", "Hard decline: suspected fraud."),
        TokenSpec(
            "tok_decline_expired", TokenBehaviour.HARD_DECLINE, "expired_card", "Hard decline: never retry."
        ),
        TokenSpec(
            "tok_timeout",
            TokenBehaviour.TIMEOUT_APPROVED,
            None,
            "Authorization approved and recorded, response lost: the caller times out.",
        ),
        TokenSpec(
            "tok_timeout_declined",
            TokenBehaviour.TIMEOUT_DECLINED,
            "do_not_honor",
            "Authorization declined and recorded, response lost: the caller times out.",
        ),
        TokenSpec(
            "tok_psp_error",
            TokenBehaviour.ERROR,
            "processor_unavailable",
            "Retryable PSP error on every authorization; nothing is recorded.",
        ),
        TokenSpec(
            "tok_psp_error_once",
            TokenBehaviour.ERROR_ONCE,
            "processor_unavailable",
            "First authorization per reference fails (retryable), later ones are approved.",
        ),
        TokenSpec(
            "tok_timeout_capture",
            TokenBehaviour.TIMEOUT_ON_CAPTURE,
            None,
            "Authorization approved; captures are processed but their responses are lost.",
        ),
        TokenSpec(
            "tok_timeout_refund",
            TokenBehaviour.TIMEOUT_ON_REFUND,
            None,
            "Authorization approved; refunds are processed but their responses are lost.",
        ),
    )
}


def behaviour_of(token: str) -> TokenSpec:
    return TEST_TOKENS.get(token) or TEST_TOKENS["tok_visa"]
