"""Admin HTTP API of merchants (`/v1/admin/merchants...`), authenticated by the admin key, and the
refresh that makes every gateway process see a merchant change within `[merchants] refresh_ms`.

Routes (the `gateway merchant ...` commands do the same through the store, store/merchants.py):

    GET  /v1/admin/merchants                     every merchant: id, name, rate limits, key prefixes
    GET  /v1/admin/merchants/{id}                one merchant, with its keys' states
    POST /v1/admin/merchants/{id}                {name?, rate_limit_per_s?, rate_limit_burst?, actor?}
    POST /v1/admin/merchants/{id}/rotate_key     {overlap_s?, actor?} -> {"id", "api_key", "merchant"}
    POST /v1/admin/merchants/{id}/revoke_key     {key, actor?}
    GET  /v1/admin/merchants/{id}/audit?limit=   the merchant's audit trail, newest first

The app caches the merchant of each API key it has seen (a store read per request would cost more
than the fast path). The cache entry of a key in its overlap window ends at the key's expiry; every
other entry ends when the merchants' change version (the last audit row) moves, which each process
polls every `refresh_ms`, so a rate-limit change, a rotation or a revocation made by any process or
command takes effect everywhere within that interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from gateway.api.http import JSON, Api, Response, Route, route
from gateway.domain.errors import error_body
from gateway.store.merchants import AUDIT_LIMIT_MAX, MerchantAdmin, MerchantError

if TYPE_CHECKING:
    from gateway.runtime.base import Runtime

log = logging.getLogger("gateway.merchants")

ADMIN_KEY_CHARS_MAX = 256
ADMIN_BODY_BYTES_MAX = 64 * 1024
MERCHANT_ID = r"(acct_[0-9a-z_]{1,64})"


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class UpdateBody(_Strict):
    name: str | None = None
    rate_limit_per_s: float | None = None
    rate_limit_burst: float | None = None
    actor: str = "admin-api"


class RotateBody(_Strict):
    overlap_s: int | None = None
    actor: str = "admin-api"


class RevokeBody(_Strict):
    key: str
    actor: str = "admin-api"


def _err(e: MerchantError) -> Response:
    return e.status, [JSON], error_body(e.status, e.code, e.message, e.param)


def _authorized(app: Api, scope: Any) -> Response | None:
    header = scope.headers.get("authorization") or ""
    key = header[7:].strip() if header.startswith("Bearer ") else ""
    challenge = ("www-authenticate", "Bearer")
    if not key or len(key) > ADMIN_KEY_CHARS_MAX:
        return 401, [JSON, challenge], error_body(401, "missing_admin_key",
                                                  "Provide the admin key as 'Authorization: Bearer ak_...'.",
                                                  kind="authentication_error")
    digest = hashlib.sha256(key.encode()).hexdigest()
    if not any(hmac.compare_digest(digest, d) for d in app.runtime.admin_digests):
        return 401, [JSON, challenge], error_body(401, "invalid_admin_key", "Invalid admin key provided.",
                                                  kind="authentication_error")
    return None


async def _call(app: Api, scope: Any, proto: Any, body_type: type[Any] | None, fn: Any) -> Response:
    refused = _authorized(app, scope)
    if refused is not None:
        return refused
    admin = app.runtime.merchant_admin()
    if admin is None or not app.runtime.ready:
        return 503, [JSON, ("retry-after", "1")], error_body(503, "starting", "The gateway is starting.")
    body = None
    if body_type is not None:
        raw = await proto()
        if len(raw) > ADMIN_BODY_BYTES_MAX:
            return 413, [JSON], error_body(413, "body_too_large", f"Bodies are limited to {ADMIN_BODY_BYTES_MAX} bytes.")
        try:
            body = msgspec.json.decode(raw or b"{}", type=body_type)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return 400, [JSON], error_body(400, "parameter_invalid", f"Invalid request body: {e}")
    try:
        out = await app.runtime.run(fn, admin, body)
    except MerchantError as e:
        return _err(e)
    return 200, [JSON], msgspec.json.encode(out)


async def list_merchants(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _call(app, scope, proto, None, lambda a, _b: {"object": "list", "data": a.all()})


async def show_merchant(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _call(app, scope, proto, None, lambda a, _b: a.show(match.group(1)))


async def update_merchant(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    def run(a: MerchantAdmin, b: UpdateBody) -> dict[str, Any]:
        return a.update(match.group(1), b.actor, name=b.name, rate_limit_per_s=b.rate_limit_per_s,
                        rate_limit_burst=b.rate_limit_burst)

    return await _call(app, scope, proto, UpdateBody, run)


async def rotate_key(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    overlap_default = app.config.merchants.key_overlap_s

    def run(a: MerchantAdmin, b: RotateBody) -> dict[str, Any]:
        key, merchant = a.rotate_key(match.group(1), b.actor, overlap_default if b.overlap_s is None else b.overlap_s)
        # The only time this key is shown: to the caller who rotated it.
        return {"id": merchant["id"], "api_key": key.expose(), "merchant": merchant}

    return await _call(app, scope, proto, RotateBody, run)


async def revoke_key(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _call(app, scope, proto, RevokeBody, lambda a, b: a.revoke_key(match.group(1), b.actor, b.key))


async def merchant_audit(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    q = {k: v[-1] for k, v in parse_qs(scope.query_string or "").items()}
    raw = q.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= AUDIT_LIMIT_MAX:
        return 400, [JSON], error_body(400, "parameter_invalid", f"limit must be 1 to {AUDIT_LIMIT_MAX}", "limit")
    return await _call(app, scope, proto, None,
                       lambda a, _b: {"object": "list", "data": a.audit(match.group(1), int(raw))})


def routes() -> list[Route]:
    return [
        route("GET", r"/v1/admin/merchants", "admin_merchants", list_merchants),
        route("GET", rf"/v1/admin/merchants/{MERCHANT_ID}", "admin_merchant_get", show_merchant),
        route("POST", rf"/v1/admin/merchants/{MERCHANT_ID}", "admin_merchant_update", update_merchant),
        route("POST", rf"/v1/admin/merchants/{MERCHANT_ID}/rotate_key", "admin_merchant_rotate_key", rotate_key),
        route("POST", rf"/v1/admin/merchants/{MERCHANT_ID}/revoke_key", "admin_merchant_revoke_key", revoke_key),
        route("GET", rf"/v1/admin/merchants/{MERCHANT_ID}/audit", "admin_merchant_audit", merchant_audit),
    ]


async def refresh_loop(runtime: Runtime, forget: Any, interval_s: float) -> None:
    """Calls `forget()` (drop the cache of authenticated keys) whenever the merchants' change version
    moves; polls it every `interval_s` (a task on the server's event loop)."""
    last: int | None = None
    while True:
        admin = runtime.merchant_admin()
        if admin is not None and runtime.ready:
            try:
                version = await runtime.run(admin.change_version)
            except Exception:
                log.exception("reading the merchants' change version failed; retrying")
            else:
                if last is not None and version != last:
                    forget()
                last = version
        await asyncio.sleep(interval_s)
