"""Merchants managed live: list, show, update rate limits, rotate and revoke API keys, with an audit trail.

Keys live in `merchant_keys` (SHA-256 of the key, a short prefix for people to recognise it, its
expiry and revocation); a key authenticates while it is neither revoked nor past its expiry. A rotation
adds a new key and gives every other live key of the merchant an expiry `overlap_s` from now (the
overlap window in which the old key still works), so merchants can roll their deployments. Every
change writes one `merchant_audit` row (who, when, what) in the same transaction; the highest audit id
is the merchants' change version that every gateway process polls (`[merchants] refresh_ms`) to drop
its cache of authenticated keys, so a change takes effect everywhere within that interval. Keys are
shown once, to whoever created them, and never stored or logged in clear.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.domain.secrets import Secret, hash_api_key, new_api_key
from gateway.store.merchants_schema import KEY_LOOKUP
from gateway.store.sql import dialect_for

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore
    from gateway.store.sql import Dialect
    from gateway.store.sqlite import SqliteStore

# Characters of a key kept to recognise it ("sk_test_AbCd"): the type prefix and 4 random characters.
KEY_PREFIX_CHARS = 12
ACTOR_CHARS_MAX = 200
NAME_CHARS_MAX = 200
# Keys one merchant may hold at once (live or within an overlap); a rotation past it is refused.
KEYS_PER_MERCHANT_MAX = 20
AUDIT_LIMIT_MAX = 1000
OVERLAP_S_MAX = 30 * 86_400
RATE_PER_S_MAX = 1_000_000.0



class MerchantError(Exception):
    """A refused change: `code` and `message` for the API's error object and the CLI's stderr."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


@dataclass(frozen=True, slots=True)
class KeyLookup:
    merchant_id: str
    name: str
    rate_limit_per_s: float | None
    rate_limit_burst: float | None
    # When this key stops working (ms), None: no expiry.
    expires_ms: int | None


def now_ms() -> int:
    return int(time.time() * 1000)


def key_prefix(key: str) -> str:
    return key[:KEY_PREFIX_CHARS]


class MerchantAdmin:
    """The merchant operations over either backend (one SQL, the store's dialect)."""

    def __init__(self, store: SqliteStore | PostgresStore) -> None:
        self._d: Dialect = dialect_for(store)

    # -- reads -----------------------------------------------------------------------------------

    def by_key_hash(self, digest: str, at_ms: int | None = None) -> KeyLookup | None:
        with self._d.read() as db:
            row = db.fetchone(KEY_LOOKUP, (digest, at_ms if at_ms is not None else now_ms()))
        return KeyLookup(*row) if row else None

    def change_version(self) -> int:
        """Grows with every change to any merchant (the last audit row's id); 0 before the first."""
        with self._d.read() as db:
            row = db.fetchone("SELECT max(id) FROM merchant_audit")
        return int(row[0]) if row and row[0] is not None else 0

    def all(self) -> list[dict[str, Any]]:
        with self._d.read() as db:
            merchants = db.fetchall(
                "SELECT id, name, rate_limit_per_s, rate_limit_burst, created FROM merchants ORDER BY created, id")
            keys = db.fetchall("SELECT merchant_id, prefix, created_ms, expires_ms, revoked_ms FROM merchant_keys"
                               " ORDER BY created_ms")
        return [_merchant_dict(m, keys) for m in merchants]

    def show(self, merchant_id: str) -> dict[str, Any]:
        with self._d.read() as db:
            m = db.fetchone("SELECT id, name, rate_limit_per_s, rate_limit_burst, created FROM merchants WHERE id = ?",
                            (merchant_id,))
            if m is None:
                raise MerchantError(404, "resource_missing", f"No such merchant: '{merchant_id[:64]}'", "id")
            keys = db.fetchall("SELECT merchant_id, prefix, created_ms, expires_ms, revoked_ms FROM merchant_keys"
                               " WHERE merchant_id = ? ORDER BY created_ms", (merchant_id,))
        return _merchant_dict(m, keys)

    def audit(self, merchant_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        limit = max(1, min(limit, AUDIT_LIMIT_MAX))
        with self._d.read() as db:
            if merchant_id is None:
                rows = db.fetchall("SELECT id, merchant_id, actor, action, detail, at_ms FROM merchant_audit"
                                   " ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = db.fetchall("SELECT id, merchant_id, actor, action, detail, at_ms FROM merchant_audit"
                                   " WHERE merchant_id = ? ORDER BY id DESC LIMIT ?", (merchant_id, limit))
        return [{"id": r[0], "merchant_id": r[1], "actor": r[2], "action": r[3], "detail": json.loads(r[4]),
                 "at_ms": r[5]} for r in rows]

    # -- changes ---------------------------------------------------------------------------------

    def update(self, merchant_id: str, actor: str, *, name: str | None = None,
               rate_limit_per_s: float | None = None, rate_limit_burst: float | None = None) -> dict[str, Any]:
        _check_actor(actor)
        changes: dict[str, Any] = {}
        if name is not None:
            if not 1 <= len(name) <= NAME_CHARS_MAX:
                raise MerchantError(400, "parameter_invalid", f"name must be 1 to {NAME_CHARS_MAX} characters", "name")
            changes["name"] = name
        for field, value, lo in (("rate_limit_per_s", rate_limit_per_s, 0.0), ("rate_limit_burst", rate_limit_burst, 1.0)):
            if value is None:
                continue
            if not (value > lo if field == "rate_limit_per_s" else value >= lo) or value > RATE_PER_S_MAX:
                bound = "> 0" if field == "rate_limit_per_s" else ">= 1"
                raise MerchantError(400, "parameter_invalid", f"{field} must be {bound} and <= {RATE_PER_S_MAX:g}",
                                    field)
            changes[field] = float(value)
        if not changes:
            raise MerchantError(400, "parameter_missing", "Nothing to update: give a name or a rate limit.")
        with self._d.tx() as db:
            before = db.fetchone("SELECT name, rate_limit_per_s, rate_limit_burst FROM merchants WHERE id = ?",
                                 (merchant_id,))
            if before is None:
                raise MerchantError(404, "resource_missing", f"No such merchant: '{merchant_id[:64]}'", "id")
            sets = ", ".join(f"{k} = ?" for k in changes)
            db.execute(f"UPDATE merchants SET {sets} WHERE id = ?", (*changes.values(), merchant_id))
            old = dict(zip(("name", "rate_limit_per_s", "rate_limit_burst"), before))
            _audit(db, merchant_id, actor, "update", {k: {"from": old[k], "to": v} for k, v in changes.items()})
        return self.show(merchant_id)

    def rotate_key(self, merchant_id: str, actor: str, overlap_s: int) -> tuple[Secret, dict[str, Any]]:
        """A new key; every other live key keeps working for `overlap_s` more seconds (0: stops now)."""
        _check_actor(actor)
        if not 0 <= overlap_s <= OVERLAP_S_MAX:
            raise MerchantError(400, "parameter_invalid", f"overlap_s must be 0 to {OVERLAP_S_MAX}", "overlap_s")
        key = new_api_key()
        at = now_ms()
        until = at + overlap_s * 1000
        with self._d.tx() as db:
            if db.fetchone("SELECT id FROM merchants WHERE id = ?", (merchant_id,)) is None:
                raise MerchantError(404, "resource_missing", f"No such merchant: '{merchant_id[:64]}'", "id")
            live = db.fetchall("SELECT prefix FROM merchant_keys WHERE merchant_id = ? AND revoked_ms IS NULL"
                               " AND (expires_ms IS NULL OR expires_ms > ?)", (merchant_id, at))
            if len(live) + 1 > KEYS_PER_MERCHANT_MAX:
                raise MerchantError(409, "too_many_keys", f"The merchant already holds {len(live)} live keys (at most"
                                    f" {KEYS_PER_MERCHANT_MAX}); revoke one first.")
            db.execute("UPDATE merchant_keys SET expires_ms = ? WHERE merchant_id = ? AND revoked_ms IS NULL"
                       " AND (expires_ms IS NULL OR expires_ms > ?)", (until, merchant_id, until))
            digest = hash_api_key(key.expose())
            db.execute("INSERT INTO merchant_keys (key_hash, merchant_id, prefix, created_ms) VALUES (?, ?, ?, ?)",
                       (digest, merchant_id, key_prefix(key.expose()), at))
            db.execute("UPDATE merchants SET api_key_hash = ? WHERE id = ?", (digest, merchant_id))
            _audit(db, merchant_id, actor, "rotate_key", {"new_key_prefix": key_prefix(key.expose()),
                                                          "overlap_s": overlap_s, "old_keys_expire_ms": until})
        return key, self.show(merchant_id)

    def revoke_key(self, merchant_id: str, actor: str, key: str) -> dict[str, Any]:
        """The key stops working now (it was this merchant's; any state: live or in its overlap)."""
        _check_actor(actor)
        digest = hash_api_key(key)
        at = now_ms()
        with self._d.tx() as db:
            row = db.fetchone("SELECT prefix, revoked_ms FROM merchant_keys WHERE key_hash = ? AND merchant_id = ?",
                              (digest, merchant_id))
            if row is None:
                raise MerchantError(404, "key_not_found", "That key is not one of this merchant's keys.", "key")
            if row[1] is None:
                db.execute("UPDATE merchant_keys SET revoked_ms = ? WHERE key_hash = ?", (at, digest))
                _audit(db, merchant_id, actor, "revoke_key", {"key_prefix": row[0]})
        return self.show(merchant_id)

    def record_created(self, merchant_id: str, actor: str, key: str) -> None:
        """A new merchant's first key and audit row (after `create_merchant` wrote the merchant)."""
        with self._d.tx() as db:
            db.execute("UPDATE merchant_keys SET prefix = ? WHERE key_hash = ?", (key_prefix(key), hash_api_key(key)))
            _audit(db, merchant_id, actor, "create", {"key_prefix": key_prefix(key)})


def _check_actor(actor: str) -> None:
    if not 1 <= len(actor) <= ACTOR_CHARS_MAX:
        raise MerchantError(400, "parameter_invalid", f"actor must be 1 to {ACTOR_CHARS_MAX} characters", "actor")


def _audit(db: Any, merchant_id: str, actor: str, action: str, detail: dict[str, Any]) -> None:
    db.execute("INSERT INTO merchant_audit (merchant_id, actor, action, detail, at_ms) VALUES (?, ?, ?, ?, ?)",
               (merchant_id, actor, action, json.dumps(detail, sort_keys=True), now_ms()))


def _merchant_dict(m: tuple[Any, ...], keys: list[tuple[Any, ...]]) -> dict[str, Any]:
    at = now_ms()
    own = []
    for merchant_id, prefix, created_ms, expires_ms, revoked_ms in keys:
        if merchant_id != m[0]:
            continue
        state = "revoked" if revoked_ms is not None else (
            "expired" if expires_ms is not None and expires_ms <= at else (
                "expiring" if expires_ms is not None else "active"))
        own.append({"prefix": prefix, "state": state, "created_ms": created_ms, "expires_ms": expires_ms,
                    "revoked_ms": revoked_ms})
    return {"id": m[0], "name": m[1], "rate_limit_per_s": m[2], "rate_limit_burst": m[3], "created": m[4],
            "key_prefixes": [k["prefix"] for k in own if k["state"] in ("active", "expiring")], "keys": own}
