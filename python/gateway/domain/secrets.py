"""Values that must never be printed: their repr and str are masked, the raw value needs `expose()`."""

from __future__ import annotations

import hashlib
import secrets as _secrets


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def expose(self) -> str:
        return self._value

    def __repr__(self) -> str:
        shown = self._value[:8] if self._value.startswith(("sk_", "whsec_", "ak_")) else ""
        return f"Secret('{shown}***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and _secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


def hash_api_key(key: str) -> str:
    """API keys are stored and looked up only by this hash, never in clear."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(livemode: bool = False) -> Secret:
    return Secret(("sk_live_" if livemode else "sk_test_") + _secrets.token_urlsafe(24))


def new_id(prefix: str) -> str:
    return f"{prefix}_{_secrets.token_hex(8)}"
