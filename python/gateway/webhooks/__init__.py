"""Events and signed webhooks.

Every payment change the workers persist writes an event in the same transaction (the transactional
outbox, `store/processing.py`), with one delivery row per subscribed endpoint; the dispatcher
(`dispatcher.py`, in every payment worker) POSTs them signed (`signature.py`), retries with backoff
and jitter, and records each outcome. Merchants verify with `verify_signature`.
"""

from gateway.webhooks.events import EVENT_TYPES, WebhookSettings
from gateway.webhooks.signature import (
    SIGNATURE_HEADER,
    WebhookSignatureError,
    compute_signature,
    sign,
    verify_signature,
)

__all__ = [
    "EVENT_TYPES",
    "SIGNATURE_HEADER",
    "WebhookSettings",
    "WebhookSignatureError",
    "compute_signature",
    "sign",
    "verify_signature",
]
