"""The async path: payment state machine, ledger postings, PSP clients, routing and retries.

These modules are pure apart from the PSP calls: they return the rows and postings to persist
and leave storage to the workers.
"""

from .ledger import Posting, PostingKind, Violation, check, postings_for_transition
from .psp_client import (
    HTTPPSPClient,
    InProcessPSPClient,
    Outcome,
    PSPClient,
    PSPResult,
    PSPStatus,
    PSPTimeout,
    PSPUnavailable,
)
from .router import (
    AttemptRow,
    AttemptStatus,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    ProcessingResult,
    PSPRoute,
    RetryPolicy,
    Router,
    ScoreWeights,
    attempt_idempotency_key,
    operation_idempotency_key,
    process_authorization,
    process_capture,
    process_refund,
    process_void,
    resolve_pending,
)
from .state_machine import AuditRow, Payment, PaymentStatus, Transition, TransitionError, new_payment

__all__ = [
    "AttemptRow",
    "AttemptStatus",
    "AuditRow",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "HTTPPSPClient",
    "InProcessPSPClient",
    "Outcome",
    "PSPClient",
    "PSPResult",
    "PSPRoute",
    "PSPStatus",
    "PSPTimeout",
    "PSPUnavailable",
    "Payment",
    "PaymentStatus",
    "Posting",
    "PostingKind",
    "ProcessingResult",
    "RetryPolicy",
    "Router",
    "ScoreWeights",
    "Transition",
    "TransitionError",
    "Violation",
    "attempt_idempotency_key",
    "check",
    "new_payment",
    "operation_idempotency_key",
    "postings_for_transition",
    "process_authorization",
    "process_capture",
    "process_refund",
    "process_void",
    "resolve_pending",
]
