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
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import msgspec

from gateway.api.app import JSON, ON_START, GatewayApp, Response, route
from gateway.domain.errors import error_body
from gateway.feed.eventlog import TIME_MS_MAX, EventLog, EventLogError, KafkaEventLog, WalEventLog
from gateway.risk import control as ctl
from gateway.risk.control import ControlError, RiskControl, RulesInvalid

log_ = logging.getLogger("gateway.risk.admin")

# List loads carry whole lists; everything else is small.
ADMIN_BODY_BYTES_MAX = 64 * 1024 * 1024
ADMIN_KEY_CHARS_MAX = 256
LIST_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
HISTORY_LIMIT_MAX = 1_000


class _Plane:
    def __init__(self, control: RiskControl, key_digests: list[str]) -> None:
        self.control = control
        self.key_digests = key_digests


# One gateway app per process; keyed by the app so tests that build several apps stay apart.
_PLANES: dict[int, _Plane] = {}


def _start(app: GatewayApp, publish: Any = None) -> RiskControl:
    """Embedded mode: an ON_START hook (SQLite). Cluster mode: called by `Cluster.start_risk` with the
    PostgreSQL store and the function that publishes a committed change on the risk channel."""
    assert app.fastpath is not None and app.store is not None
    cfg = app.config.risk
    if cfg.geoip_file:
        app.fastpath.set_geo_csv(Path(cfg.geoip_file).read_text())
    model_path = Path(cfg.model_path) if cfg.model_path else ctl.SHIPPED_MODEL
    pool = getattr(app.store, "pool", None) if app.cluster is not None else None
    control = RiskControl(app.store, app.fastpath.risk, model_path, pg_pool=pool, publish=publish)
    control.restore()
    digests = [cfg.admin_key_sha256] if cfg.admin_key_sha256 else []
    key = os.environ.get(cfg.admin_key_env, "")
    if key:
        digests.append(hashlib.sha256(key.encode()).hexdigest())
    if not digests:
        log_.warning("no admin key configured ([risk] admin_key_env or admin_key_sha256): the admin API refuses all")
    _PLANES[id(app)] = _Plane(control, digests)
    return control


def _start_embedded(app: GatewayApp) -> None:
    _start(app)


ON_START.append(_start_embedded)


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


def _plane(app: GatewayApp, scope: Any) -> RiskControl:
    plane = _PLANES.get(id(app))
    if plane is None:
        raise _Refused(_error(503, "risk_control_unavailable", "The risk control plane is not started yet."))
    header = scope.headers.get("authorization") or ""
    key = header[7:].strip() if header.startswith("Bearer ") else ""
    if not key or len(key) > ADMIN_KEY_CHARS_MAX:
        raise _Refused((401, [JSON, ("www-authenticate", "Bearer")], error_body(
            401, "missing_admin_key", "Provide the admin key as 'Authorization: Bearer ak_...'.",
            kind="authentication_error")))
    digest = hashlib.sha256(key.encode()).hexdigest()
    # compare_digest against every configured digest, so timing does not say which one nearly matched.
    if not any(hmac.compare_digest(digest, d) for d in plane.key_digests):
        raise _Refused((401, [JSON, ("www-authenticate", "Bearer")], error_body(
            401, "invalid_admin_key", "Invalid admin key provided.", kind="authentication_error")))
    return plane.control


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

    async def wrapped(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
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


@route("POST", r"/v1/admin/rules", "admin_rules_push")
@_handler
async def push_rules(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, PushBody)
    rv = control.push(b.source, author=b.author, comment=b.comment, merchant_id=b.merchant_id or None,
                      shadow=b.shadow)
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)}, 201)


@route("GET", r"/v1/admin/rules", "admin_rules_active")
@_handler
async def active_rules(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    return _ok({"object": "list", "data": [msgspec.structs.asdict(rv) for rv in control.active()],
                "engine_version": control.engine.rules_version(), "model_hash": control.engine.model_hash()})


@route("POST", r"/v1/admin/rules/validate", "admin_rules_validate")
@_handler
async def validate_rules(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, SourceBody)
    return _ok({"valid": True, "rules": control.check(b.source)})


@route("GET", r"/v1/admin/rules/history", "admin_rules_history")
@_handler
async def rules_history(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    limit = _int(q, "limit", 100, 1, HISTORY_LIMIT_MAX)
    before = _int(q, "before", 0, 0, 2**62)
    data = control.history(q.get("scope"), q.get("merchant_id"), limit, before or None)
    return _ok({"object": "list", "data": data, "has_more": len(data) == limit})


@route("POST", r"/v1/admin/rules/rollback", "admin_rules_rollback")
@_handler
async def rollback_rules(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, RollbackBody)
    rv = control.rollback(b.version, author=b.author, comment=b.comment)
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)}, 201)


@route("POST", r"/v1/admin/rules/shadow", "admin_shadow_set")
@_handler
async def shadow_set(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, PushBody)
    rv = control.push(b.source, author=b.author, comment=b.comment, shadow=True, merchant_id=b.merchant_id)
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)}, 201)


@route("DELETE", r"/v1/admin/rules/shadow", "admin_shadow_clear")
@_handler
async def shadow_clear(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    rv = control.clear(author=q.get("author", "admin"), comment=q.get("comment", ""))
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)})


@route("GET", r"/v1/admin/rules/shadow", "admin_shadow_stats")
@_handler
async def shadow_stats(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    return _ok({"object": "risk_shadow_stats", **control.shadow_stats()})


@route("DELETE", r"/v1/admin/rules/merchants/([^/]{1,255})", "admin_rules_merchant_clear")
@_handler
async def merchant_clear(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    rv = control.clear(author=q.get("author", "admin"), comment=q.get("comment", ""), merchant_id=match.group(1))
    return _ok({"object": "risk_ruleset", **msgspec.structs.asdict(rv)})


@route("POST", r"/v1/admin/rules/backtest", "admin_rules_backtest")
@_handler
async def rules_backtest(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
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
    fp = app.fastpath
    assert fp is not None
    cfg = app.config.risk
    log: EventLog
    if control.clustered:
        c = app.config.cluster
        log, conn, kind = KafkaEventLog(c.kafka_bootstrap, c.topic), control.db, "kafka"
    else:
        log, conn, kind = WalEventLog(str(app.data_dir / "wal"), fp.committed_lsn()), None, "wal"

    def run() -> dict[str, Any]:
        engine = ctl.backtest_engine(conn if conn is not None else control.store._conn(), b.source, b.merchant_id,
                                     control.model_bytes, cfg.backtest_keys_per_dimension_max)
        return ctl.backtest_log(engine, log, fp.ip_country, cfg.backtest_records_max, since_ms=b.since_ms,
                                until_ms=until_ms, after_lsn=b.after_lsn, source=kind)

    try:
        return _ok(await asyncio.to_thread(run))
    except EventLogError as e:
        log_.warning("backtest could not read the event log: %s", e)
        return _error(503, "event_log_unavailable", f"The event log could not be read: {e}")


# -- lists -----------------------------------------------------------------------------------------


@route("GET", r"/v1/admin/lists", "admin_lists")
@_handler
async def lists(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    return _ok({"object": "list", "data": control.lists()})


@route("POST", r"/v1/admin/lists", "admin_list_create")
@_handler
async def list_create(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, CreateListBody)
    if not re.fullmatch(LIST_NAME, b.name):
        raise ControlError(400, "parameter_invalid", f"List names match {LIST_NAME}.", "name")
    if b.kind not in ctl.LIST_KINDS:
        raise ControlError(400, "parameter_invalid", f"kind must be one of {', '.join(ctl.LIST_KINDS)}.", "kind")
    return _ok({"object": "risk_list", **control.create_list(b.name, b.kind, b.entries_max, b.author)}, 201)


@route("GET", rf"/v1/admin/lists/({LIST_NAME})", "admin_list_get")
@_handler
async def list_get(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    limit = _int(q, "limit", 100, 1, 10_000)
    return _ok({"object": "risk_list", **control.get_list(match.group(1), limit, q.get("after", ""))})


@route("POST", rf"/v1/admin/lists/({LIST_NAME})/(add|remove|load)", "admin_list_change")
@_handler
async def list_change(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
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


@route("GET", r"/v1/admin/audit", "admin_audit")
@_handler
async def audit(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    q = _query(scope)
    return _ok({"object": "list", "data": control.audit(q.get("target"), _int(q, "limit", 100, 1, HISTORY_LIMIT_MAX))})


@route("POST", r"/v1/admin/model/reload", "admin_model_reload")
@_handler
async def model_reload(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    control = _plane(app, scope)
    b = await _body(scope, proto, ActorBody)
    return _ok({"object": "risk_model", "model_hash": control.reload_model(b.author),
                "path": str(control.model_path)})
