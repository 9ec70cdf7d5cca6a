"""What the risk control plane, its sync between processes and its backtests share: limits, the refusal
errors, the ruleset version record and the normalisation of list values.

No I/O here. `normalize` is the engine's own normalisation, so that a value stored by the control plane
and the value the engine holds are the same string.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from gateway._fastpath import RulesError

SHIPPED_MODEL = Path(__file__).with_name("model.json")
LIST_KINDS = ("card", "bin", "email", "ip", "device", "country", "string")
VALUE_BYTES_MAX = 256
# Values an audit row keeps verbatim; its `count` is always exact.
AUDIT_VALUES_MAX = 1_000
# Entries handed to the engine per call when lists are restored or loaded.
CHUNK_VALUES = 10_000
SOURCE_BYTES_MAX = 8 * 1024 * 1024
AUTHOR_CHARS_MAX = 200
COMMENT_CHARS_MAX = 2_000
# Audit rows one list repair reads per query, and values it diffs one by one before it reloads the list.
LIST_REPAIR_ROWS_MAX = 1_000
LIST_REPAIR_VALUES_MAX = 100_000


class ControlError(Exception):
    """A refused control-plane request: HTTP status, error code, message and offending parameter."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


class RulesInvalid(ControlError):
    """A ruleset that does not compile; `errors` holds every located error."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(400, "rules_invalid", message, "source")
        self.errors = errors


def rules_invalid(err: RulesError) -> RulesInvalid:
    located = [{"line": ln, "column": col, "kind": kind, "message": msg} for ln, col, kind, msg in err.args[1]]
    return RulesInvalid(str(err.args[0]), located)


class RulesetVersion(msgspec.Struct):
    version: int
    scope: str  # "global" | "merchant" | "shadow"
    merchant_id: str | None
    source: str | None
    author: str
    comment: str
    operation: str  # "push" | "rollback" | "clear"
    rollback_of: int | None
    created_ms: int

    def row(self) -> tuple[Any, ...]:
        """The stored row (columns as `gateway.store.risk.RULESET_COLUMNS`; no merchant is '')."""
        return (self.version, self.scope, self.merchant_id or "", self.source, self.author, self.comment,
                self.operation, self.rollback_of, self.created_ms)


def ruleset_from_row(r: tuple[Any, ...]) -> RulesetVersion:
    return RulesetVersion(r[0], r[1], r[2] or None, r[3], r[4], r[5], r[6], r[7], r[8])


def normalize(kind: str, value: str) -> str:
    """The engine's own normalisation, applied before storing so that add and remove agree."""
    if kind == "email":
        return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in value)
    if kind == "country":
        return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in value)
    return value


def check_text(value: str, name: str, chars_max: int) -> str:
    if len(value) > chars_max:
        raise ControlError(400, "parameter_invalid", f"{name} is longer than {chars_max} characters.", name)
    return value


def chunks(values: Iterator[str] | Iterable[str], size: int = CHUNK_VALUES) -> Iterator[list[str]]:
    chunk: list[str] = []
    for v in values:
        chunk.append(v)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
