"""Event types, endpoint limits and the dispatcher's settings (no I/O here).

`WebhookSettings` holds values already validated by gateway.config (`[webhooks]`, the same names);
this module reads no environment and no file.
"""

from __future__ import annotations

import ipaddress
import random
import secrets as _secrets
from dataclasses import dataclass

from gateway.domain.secrets import Secret

# One event per persisted payment change: `payment.<new status>`, and `payment.operation_failed` when
# the PSP refuses a capture, void or refund (the payment's status does not change then).
EVENT_TYPES: tuple[str, ...] = (
    "payment.authorized",
    "payment.captured",
    "payment.refunded",
    "payment.partially_refunded",
    "payment.failed",
    "payment.canceled",
    "payment.pending_verification",
    "payment.operation_failed",
)
ALL_EVENTS = "*"
OPERATION_FAILED = "payment.operation_failed"

ENDPOINT_ID_PREFIX = "we"
EVENT_ID_PREFIX = "evt"
SECRET_PREFIX = "whsec_"
ENDPOINT_URL_CHARS_MAX = 2048
ENDPOINTS_PER_MERCHANT_MAX = 16
ENABLED_EVENTS_MAX = len(EVENT_TYPES) + 1
DESCRIPTION_CHARS_MAX = 255
# A payment changes a handful of times; the bound keeps event ids fixed-width (so they sort by n).
EVENTS_PER_PAYMENT_MAX = 999_999
# Deliveries of one event listed with it.
DELIVERIES_PER_EVENT_MAX = ENDPOINTS_PER_MERCHANT_MAX


def event_type_for_status(status: str) -> str | None:
    t = f"payment.{status}"
    return t if t in EVENT_TYPES else None


def new_endpoint_secret() -> Secret:
    return Secret(SECRET_PREFIX + _secrets.token_urlsafe(32))


def event_id_prefix(payment_id: str) -> str:
    return f"{EVENT_ID_PREFIX}_{payment_id.removeprefix('pay_')}_"


# Letters only: a random part never holds, nor extends a counter's digits into, a run the card-number
# guard refuses in a path (a hex tail made 0.7% of event ids, and 24 hex characters 0.18% of operation
# and endpoint ids, unreadable: GET /v1/events/{id} answered 400).
_ID_ALPHABET = "abcdefghjkmnpqrstvwxyz"
EVENT_TAIL_CHARS = 8
ID_RANDOM_CHARS = 24
# `bytes.translate` table: byte b → letter b % 22; the bytes 242..255 (where b % 22 would favour the first
# 14 letters) are dropped, so every letter kept is exactly uniform.
_LETTER_OF_BYTE = bytes(ord(_ID_ALPHABET[b % len(_ID_ALPHABET)]) for b in range(256))
_UNEVEN_BYTES = bytes(range(256 - 256 % len(_ID_ALPHABET), 256))


def random_letters(n: int) -> str:
    """`n` random letters (4.46 bits each): the random part of an id that goes into a path. One draw of
    the system's random source for all of them (a quarter more bytes than letters, plus 8: 5.5% of the
    bytes are dropped to keep the letters uniform; a draw left short, very rare, is topped up), each byte
    mapped to its letter in C (`bytes.translate`). A draw per letter cost about 10 us per id on the
    worker's hot path, and a base-22 expansion of one big draw 2.5 (8 letters) to 5 us (24)."""
    letters = _secrets.token_bytes(n + (n >> 2) + 8).translate(_LETTER_OF_BYTE, _UNEVEN_BYTES)
    while len(letters) < n:
        letters += _secrets.token_bytes(n).translate(_LETTER_OF_BYTE, _UNEVEN_BYTES)
    return letters[:n].decode("ascii")


def event_id(payment_id: str, n: int) -> str:
    """The id of the payment's `n`-th event (n >= 1): ids of one payment sort in the order of their events.
    A random tail keeps ids unique even where payment state is rebuilt while events are kept."""
    assert 1 <= n <= EVENTS_PER_PAYMENT_MAX
    return f"{event_id_prefix(payment_id)}{n:06d}{random_letters(EVENT_TAIL_CHARS)}"


def new_endpoint_id() -> str:
    return f"{ENDPOINT_ID_PREFIX}_{random_letters(ID_RANDOM_CHARS)}"


def private_address(address: str) -> bool:
    """Loopback, private, link-local, multicast or unspecified: not a merchant's public endpoint."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_multicast


def subscribed(enabled_events: list[str], event_type: str) -> bool:
    return ALL_EVENTS in enabled_events or event_type in enabled_events


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """How the dispatcher sends (docs/webhooks.md); built from the `[webhooks]` config section, which
    checks every range (1 <= retry_base_ms <= retry_max_ms, ...)."""

    attempts_max: int = 12
    retry_base_ms: int = 5_000
    retry_max_ms: int = 3_600_000
    timeout_ms: int = 10_000
    concurrency: int = 32
    poll_ms: int = 200
    batch_max: int = 100
    allow_private_urls: bool = False

    @property
    def lease_ms(self) -> int:
        """How long a claimed delivery is hidden from other dispatchers: longer than a send can take, so
        a delivery comes back only if its dispatcher died (at-least-once)."""
        return self.timeout_ms + 5_000

    def retry_delay_ms(self, attempts: int, rng: random.Random | None = None) -> int:
        """Delay before attempt `attempts + 1`: base × 2^(attempts-1), capped, with "equal jitter"
        (between half and all of it) so that a recovering receiver is not hit by every retry at once."""
        assert attempts >= 1
        full = min(self.retry_max_ms, self.retry_base_ms * (1 << min(attempts - 1, 40)))
        r = rng or random
        return full // 2 + int(r.random() * (full - full // 2))
