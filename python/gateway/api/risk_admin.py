"""Admin HTTP API of the risk control plane (`/v1/admin/...`), authenticated by the admin key.

The key (`Authorization: Bearer ak_...`) is compared by its SHA-256 digest with the one configured in
`[risk]` (an environment variable holding the key, or the digest itself); it is never logged. Every
change goes through `gateway.risk.control.RiskControl`, which validates, stores, then swaps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import sqlite3
import time
from typing import Annotated, Any
from urllib.parse import parse_qs

import msgspec

from gateway.api import guard
from gateway.api.http import JSON, Api, Response, Route, route
from gateway.domain.errors import error_body
from gateway.feed.eventlog import TIME_MS_MAX, EventLogError
from gateway.risk import control as ctl
from gateway.risk.control import ControlError, RiskControl, RulesInvalid

log_ = logging.getLogger("gateway.risk.admin")

# List loads carry whole lists; everything else is small.
ADMIN_BODY_BYTES_MAX = 64 * 1024 * 1024
ADMIN_KEY_CHARS_MAX = 256
LIST_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
HISTORY_LIMIT_MAX = 1_000
# Every number and text of an admin request is bounded here, before it reaches the engine or SQL
# (a version past 2^63 overflows SQLite; a NUL has length 0 to SQLite's CHECK and is refused by
# PostgreSQL): the store's CHECK constraints are a second line, mapped to 400 by `_handler` too.
VERSION_MAX = 2**62
# The engine's own bound on a list (rust/risk LIST_ENTRIES_MAX).
LIST_ENTRIES_MAX = 10_000_000
MERCHANT_ID_CHARS_MAX = 255
LIST_GET_LIMIT_MAX = 10_000
# Author: printable, no control character; comments may hold line breaks and tabs.
_AUTHOR_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_COMMENT_PATTERN = r"^[^\x00-\x08\x0b-\x1f\x7f]*$"
_PRINTABLE_ASCII = r"^[\x20-\x7e]+$"
_TEXT_RULES = {"author": (_AUTHOR_PATTERN, ctl.AUTHOR_CHARS_MAX), "comment": (_COMMENT_PATTERN, ctl.COMMENT_CHARS_MAX)}

Author = Annotated[str, msgspec.Meta(min_length=1, max_length=ctl.AUTHOR_CHARS_MAX, pattern=_AUTHOR_PATTERN)]
Comment = Annotated[str, msgspec.Meta(max_length=ctl.COMMENT_CHARS_MAX, pattern=_COMMENT_PATTERN)]
MerchantId = Annotated[str, msgspec.Meta(max_length=MERCHANT_ID_CHARS_MAX, pattern=_PRINTABLE_ASCII)]
Version = Annotated[int, msgspec.Meta(ge=1, le=VERSION_MAX)]
Position = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
EntriesMax = Annotated[int, msgspec.Meta(ge=1, le=LIST_ENTRIES_MAX)]
_AT_PATH = re.compile(r"at `\$\.(\w+)")
try:  # The store errors that a bad value can cause (cluster mode: PostgreSQL's as well).
    import psycopg

    _STORE_VALUE_ERRORS: tuple[type[BaseException], ...] = (
        sqlite3.IntegrityError, sqlite3.DataError, OverflowError, psycopg.errors.IntegrityError,
        psycopg.errors.DataError)
except ImportError:  # pragma: no cover - psycopg comes with the cluster requirements
    _STORE_VALUE_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError)


# -- request plumbing ------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _error(status: int, code: str, message: str, param: str | None = None, **extra: Any) -> Response:
    if not extra:
        return status, [JSON], error_body(status, code, message, param)
    kind = "invalid_request_error" if status < 500 else "api_error"
    body = error_body(status, code, message, param, kind=kind)
    # The extra fields (a ruleset's compile errors) join the masked error object.
    return status, [JSON], body[:-2] + b"," + msgspec.json.encode(extra)[1:] + b"}"


def _ok(obj: Any, status: int = 200) -> Response:
    return status, [JSON], msgspec.json.encode(obj)


def _plane(app: Api, scope: Any) -> RiskControl:
    control = app.runtime.risk_control
    if control is None or not app.runtime.ready:
        raise _Refused(_error(503, "risk_control_unavailable", "The risk control plane is not started yet."))
    header = scope.headers.get("authorization") or ""
    key = header[7:].strip() if header.startswith("Bearer ") else ""
    if not key or len(key) > ADMIN_KEY_CHARS_MAX:
        raise _Refused((401, [JSON, ("www-authenticate", "Bearer")], error_body(
            401, "missing_admin_key", "Provide the admin key as 'Authorization: Bearer ak_...'.",
            kind="authentication_error")))
    digest = hashlib.sha256(key.encode()).hexdigest()
    # compare_digest against every configured digest, so timing does not say which one nearly matched.
    if not any(hmac.compare_digest(digest, d) for d in app.runtime.admin_digests):
        raise _Refused((401, [JSON, ("www-authenticate", "Bearer")], error_body(
            401, "invalid_admin_key", "Invalid admin key provided.", kind="authentication_error")))
    return control


async def _body(scope: Any, proto: Any, typ: type[Any]) -> Any:
    # Strings and keys only: admin numbers are times, versions and positions (a 13-digit ms time is
    # Luhn-valid one time in ten); rules sources, list values and audit text are strings.
    raw = await guard.read_json_body(scope, proto, ADMIN_BODY_BYTES_MAX, numbers=False, invalid_code="body_invalid")
    if not isinstance(raw, bytes):
        raise _Refused(raw)
    try:
        return msgspec.json.decode(raw or b"{}", type=typ)
    except msgspec.ValidationError as e:
        at = _AT_PATH.search(str(e))
        raise _Refused(_error(400, "parameter_invalid", f"Invalid request body: {e}",
                              at.group(1) if at else None)) from None
    except msgspec.DecodeError:
        raise _Refused(_error(400, "body_invalid", "The request body is not valid JSON.")) from None


def _query(scope: Any) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.query_string or "").items()}


def _int(q: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    value = guard.strict_int(raw, lo, hi)
    if value is None:
        raise _Refused(_error(400, "parameter_invalid", f"{name} must be an integer from {lo} to {hi}.", name))
    return value


def _text(q: dict[str, str], name: str, default: str) -> str:
    """An author or comment given in the query string, checked as the same field of a body is."""
    value = q.get(name, default)
    pattern, chars_max = _TEXT_RULES[name]
    if len(value) > chars_max or (value and not re.match(pattern, value)) or (name == "author" and not value):
        raise _Refused(_error(400, "parameter_invalid",
                              f"{name} must be at most {chars_max} characters, without control characters.", name))
    return value


def _store_param(e: BaseException) -> str | None:
    """The field a store constraint error names, when it names one of the request's fields."""
    text = str(e)
    return next((f for f in ("author", "comment", "version", "entries_max", "merchant_id", "name") if f in text), None)


def _handler(fn: Any) -> Any:
    """Turns `_Refused` and `ControlError` into error responses."""

    async def wrapped(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
        try:
            return await fn(app, scope, proto, match)
        except _Refused as r:
            return r.response
        except RulesInvalid as e:
            return _error(400, e.code, e.message, e.param, errors=e.errors)
        except ControlError as e:
            return _error(e.status, e.code, e.message, e.param)
        except _STORE_VALUE_ERRORS as e:
            # A value the checks above let through and the store refused: the request's fault, not a 500.
            log_.warning("admin %s refused by the store: %s", fn.__name__, type(e).__name__)
            return _error(400, "parameter_invalid", "A value of the request is out of the stored range.",
                          _store_param(e))

    wrapped.__name__ = fn.__name__
    return wrapped


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class PushBody(_Strict):
    source: str
    merchant_id: MerchantId | None = None
    shadow: bool = False
    author: Author = "admin"
    comment: Comment = ""


class SourceBody(_Strict):
    source: str
    merchant_id: MerchantId | None = None


class BacktestBody(_Strict):
    source: str
    merchant_id: MerchantId | None = None
    # Records accepted in [since_ms, until_ms) (until_ms: the time of the request when not given).
    since_ms: Position = 0
    until_ms: Position | None = None
    # Embedded mode only: replay the records after this LSN of the WAL.
    after_lsn: Position = 0


class RollbackBody(_Strict):
    version: Version
    author: Author = "admin"
    comment: Comment = ""


class ActorBody(_Strict):
    author: Author = "admin"
    comment: Comment = ""


class CreateListBody(_Strict):
    name: Annotated[str, msgspec.Meta(max_length=64)]
    kind: Annotated[str, msgspec.Meta(max_length=16)]
    entries_max: EntriesMax | None = None
    author: Author = "admin"


class ValuesBody(_Strict):
    values: list[str]
    author: Author = "admin"


# -- rules -----------------------------------------------------------------------------------------


@_handler
async def push_rules(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, PushBody)
    rv = control.push(b.source, author=b.author, comment=b.comment, merchant_id=b.merchant_id or None,
                      shadow=b.shadow)
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)}, 201)


@_handler
async def active_rules(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    return _ok({"object": "list", "data": [msgspec.structs.asdict(rv) for rv in control.active()],
                "engine_version": control.engine.rules_version(), "model_hash": control.engine.model_hash()})


@_handler
async def validate_rules(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, SourceBody)
    return _ok({"valid": True, "rules": control.check(b.source)})


@_handler
async def rules_history(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    limit = _int(q, "limit", 100, 1, HISTORY_LIMIT_MAX)
    before = _int(q, "before", 0, 0, VERSION_MAX)
    data = control.history(q.get("scope"), q.get("merchant_id"), limit, before or None)
    return _ok({"object": "list", "data": data, "has_more": len(data) == limit})


@_handler
async def rollback_rules(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, RollbackBody)
    rv = control.rollback(b.version, author=b.author, comment=b.comment)
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)}, 201)


@_handler
async def shadow_set(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, PushBody)
    rv = control.push(b.source, author=b.author, comment=b.comment, shadow=True, merchant_id=b.merchant_id)
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)}, 201)


@_handler
async def shadow_clear(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    rv = control.clear(author=_text(q, "author", "admin"), comment=_text(q, "comment", ""))
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)})


@_handler
async def shadow_stats(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    return _ok({"object": "risk_shadow_stats", **control.shadow_stats()})


@_handler
async def merchant_clear(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    rv = control.clear(author=_text(q, "author", "admin"), comment=_text(q, "comment", ""),
                       merchant_id=match.group(1))
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)})


@_handler
async def rules_backtest(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    """Replays the recorded payments through a candidate ruleset. Embedded mode reads this process's
    WAL; cluster mode reads the Kafka topic (every process's records) and the control plane's
    PostgreSQL. Both stop at `[risk] backtest_records_max` payments and at `until_ms` (default: now)."""
    control = _plane(app, scope)
    b = await _body(scope, proto, BacktestBody)
    until_ms = b.until_ms if b.until_ms is not None else int(time.time() * 1000)
    if not 0 <= b.since_ms <= until_ms <= TIME_MS_MAX:
        raise ControlError(400, "parameter_invalid", "since_ms and until_ms must satisfy 0 <= since_ms <= until_ms.",
                           "since_ms")
    if b.after_lsn < 0:
        raise ControlError(400, "parameter_invalid", "after_lsn must be >= 0.", "after_lsn")
    if control.clustered and b.after_lsn:
        raise ControlError(400, "parameter_invalid",
                           "after_lsn names a position in one WAL; in cluster mode bound the replay with since_ms.",
                           "after_lsn")
    control.check(b.source)
    fp = app.runtime.fastpath
    assert fp is not None
    cfg = app.config.risk
    log, kind = app.runtime.event_log()

    def run() -> dict[str, Any]:
        engine = ctl.backtest_engine(control.risk_store, b.source, b.merchant_id, control.model_bytes,
                                     cfg.backtest_keys_per_dimension_max)
        return ctl.backtest_log(engine, log, fp.ip_country, cfg.backtest_records_max, since_ms=b.since_ms,
                                until_ms=until_ms, after_lsn=b.after_lsn, source=kind)

    try:
        return _ok(await asyncio.to_thread(run))
    except EventLogError as e:
        log_.warning("backtest could not read the event log: %s", e)
        return _error(503, "event_log_unavailable", f"The event log could not be read: {e}")


# -- lists -----------------------------------------------------------------------------------------


@_handler
async def lists(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    return _ok({"object": "list", "data": control.lists()})


@_handler
async def list_create(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, CreateListBody)
    if not re.fullmatch(LIST_NAME, b.name):
        raise ControlError(400, "parameter_invalid", f"List names match {LIST_NAME}.", "name")
    if b.kind not in ctl.LIST_KINDS:
        raise ControlError(400, "parameter_invalid", f"kind must be one of {', '.join(ctl.LIST_KINDS)}.", "kind")
    return _ok({"object": "risk_list", **control.create_list(b.name, b.kind, b.entries_max, b.author)}, 201)


@_handler
async def list_get(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    limit = _int(q, "limit", 100, 1, LIST_GET_LIMIT_MAX)
    return _ok({"object": "risk_list", **control.get_list(match.group(1), limit, q.get("after", ""))})


@_handler
async def list_change(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, ValuesBody)
    name, op = match.group(1), match.group(2)
    if op == "add":
        out = {"added": await asyncio.to_thread(control.list_add, name, b.values, b.author)}
    elif op == "remove":
        out = {"removed": await asyncio.to_thread(control.list_remove, name, b.values, b.author)}
    else:
        added, removed = await asyncio.to_thread(control.list_load, name, b.values, b.author)
        out = {"added": added, "removed": removed}
    entries = control.get_list(name, 1)["entries"]
    return _ok({"object": "risk_list_change", "list": name, **out, "entries": entries})


@_handler
async def audit(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    return _ok({"object": "list", "data": control.audit(q.get("target"), _int(q, "limit", 100, 1, HISTORY_LIMIT_MAX))})


@_handler
async def model_reload(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, ActorBody)
    return _ok({"object": "risk_model", "model_hash": control.reload_model(b.author),
                "path": str(control.model_path)})


def routes() -> list[Route]:
    """This module's endpoints, for the app's route table."""
    return [
        route("POST", r"/v1/admin/rules", "admin_rules_push", push_rules),
        route("GET", r"/v1/admin/rules", "admin_rules_active", active_rules),
        route("POST", r"/v1/admin/rules/validate", "admin_rules_validate", validate_rules),
        route("GET", r"/v1/admin/rules/history", "admin_rules_history", rules_history),
        route("POST", r"/v1/admin/rules/rollback", "admin_rules_rollback", rollback_rules),
        route("POST", r"/v1/admin/rules/shadow", "admin_shadow_set", shadow_set),
        route("DELETE", r"/v1/admin/rules/shadow", "admin_shadow_clear", shadow_clear),
        route("GET", r"/v1/admin/rules/shadow", "admin_shadow_stats", shadow_stats),
        route("DELETE", r"/v1/admin/rules/merchants/([^/]{1,255})", "admin_rules_merchant_clear", merchant_clear),
        route("POST", r"/v1/admin/rules/backtest", "admin_rules_backtest", rules_backtest),
        route("GET", r"/v1/admin/lists", "admin_lists", lists),
        route("POST", r"/v1/admin/lists", "admin_list_create", list_create),
        route("GET", rf"/v1/admin/lists/({LIST_NAME})", "admin_list_get", list_get),
        route("POST", rf"/v1/admin/lists/({LIST_NAME})/(add|remove|load)", "admin_list_change", list_change),
        route("GET", r"/v1/admin/audit", "admin_audit", audit),
        route("POST", r"/v1/admin/model/reload", "admin_model_reload", model_reload),
    ]
