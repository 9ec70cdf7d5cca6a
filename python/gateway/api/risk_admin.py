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
import time
from typing import Any
from urllib.parse import parse_qs

import msgspec

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


# -- request plumbing ------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _error(status: int, code: str, message: str, param: str | None = None, **extra: Any) -> Response:
    if not extra:
        return status, [JSON], error_body(status, code, message, param)
    kind = "invalid_request_error" if status < 500 else "api_error"
    return status, [JSON], msgspec.json.encode(
        {"error": {"type": kind, "code": code, "message": message, "param": param, **extra}})


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
    length = scope.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > ADMIN_BODY_BYTES_MAX:
        raise _Refused(_error(413, "body_too_large", f"Admin request bodies are limited to {ADMIN_BODY_BYTES_MAX} bytes."))
    raw = await proto()
    if len(raw) > ADMIN_BODY_BYTES_MAX:
        raise _Refused(_error(413, "body_too_large", f"Admin request bodies are limited to {ADMIN_BODY_BYTES_MAX} bytes."))
    try:
        return msgspec.json.decode(raw or b"{}", type=typ)
    except msgspec.ValidationError as e:
        raise _Refused(_error(400, "parameter_invalid", f"Invalid request body: {e}")) from None
    except msgspec.DecodeError:
        raise _Refused(_error(400, "body_invalid", "The request body is not valid JSON.")) from None


def _query(scope: Any) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.query_string or "").items()}


def _int(q: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise _Refused(_error(400, "parameter_invalid", f"{name} must be an integer from {lo} to {hi}.", name))
    return int(raw)


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

    wrapped.__name__ = fn.__name__
    return wrapped


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class PushBody(_Strict):
    source: str
    merchant_id: str | None = None
    shadow: bool = False
    author: str = "admin"
    comment: str = ""


class SourceBody(_Strict):
    source: str
    merchant_id: str | None = None


class BacktestBody(_Strict):
    source: str
    merchant_id: str | None = None
    # Records accepted in [since_ms, until_ms) (until_ms: the time of the request when not given).
    since_ms: int = 0
    until_ms: int | None = None
    # Embedded mode only: replay the records after this LSN of the WAL.
    after_lsn: int = 0


class RollbackBody(_Strict):
    version: int
    author: str = "admin"
    comment: str = ""


class ActorBody(_Strict):
    author: str = "admin"
    comment: str = ""


class CreateListBody(_Strict):
    name: str
    kind: str
    entries_max: int | None = None
    author: str = "admin"


class ValuesBody(_Strict):
    values: list[str]
    author: str = "admin"


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
    before = _int(q, "before", 0, 0, 2**62)
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
    rv = control.clear(author=q.get("author", "admin"), comment=q.get("comment", ""))
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)})


@_handler
async def shadow_stats(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    return _ok({"object": "risk_shadow_stats", **control.shadow_stats()})


@_handler
async def merchant_clear(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    rv = control.clear(author=q.get("author", "admin"), comment=q.get("comment", ""), merchant_id=match.group(1))
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
    limit = _int(q, "limit", 100, 1, 10_000)
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
