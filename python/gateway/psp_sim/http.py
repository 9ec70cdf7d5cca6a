"""HTTP transport for the simulator: an RSGI app served by granian.

Routes (one simulator per PSP name, all in one process so their state is shared across requests):

    POST /v1/{psp}/authorize   {"reference", "amount", "currency", "token"}
    POST /v1/{psp}/capture     {"psp_reference", "amount", "final"}
    POST /v1/{psp}/void        {"psp_reference"}
    POST /v1/{psp}/refund      {"psp_reference", "amount"}
    GET  /v1/{psp}/status?reference=…|psp_reference=…|idempotency_key=…
    GET  /v1/{psp}/settlement/{YYYY-MM-DD}.csv
    GET  /health

The bodies are the types of psp/wire.py, the ones the HTTP client sends and reads, so the two ends
cannot drift apart. Mutating calls need an `Idempotency-Key` header. The response body always carries `outcome`;
status codes follow it (200 approved, 402 declined, 429/503 retryable error, 400/409/422 invalid).
A lost response holds the connection for the profile's `timeout_hang_ms` and then answers 504,
long after any sensible client has timed out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import date
from typing import Any
from urllib.parse import parse_qs

import msgspec

from gateway.psp.wire import AuthorizeRequest, CaptureRequest, RefundRequest, VoidRequest

from .core import TRANSACTIONS_MAX_DEFAULT, ResponseLost, SimResponse, SimulatedPSP
from .profiles import DEFAULT_PROFILES, PSPProfile

BODY_BYTES_MAX = 16 * 1024
CONFIG_ENV = "GATEWAY_PSP_SIM_CONFIG"

_JSON_HEADERS = [("content-type", "application/json")]


class SimConfig(msgspec.Struct):
    profiles: list[PSPProfile]
    seed: int = 0
    time_scale: float = 1.0
    transactions_max: int = TRANSACTIONS_MAX_DEFAULT


_ENCODER = msgspec.json.Encoder()
# The request bodies are the client's (psp/wire.py), decoded strictly: an unknown field is a 400.
_AUTHORIZE = msgspec.json.Decoder(AuthorizeRequest)
_CAPTURE = msgspec.json.Decoder(CaptureRequest)
_VOID = msgspec.json.Decoder(VoidRequest)
_REFUND = msgspec.json.Decoder(RefundRequest)


def _status_code(response: SimResponse) -> int:
    if response.outcome == "approved":
        return 200
    if response.outcome in ("soft_decline", "hard_decline"):
        return 402
    if response.retryable:
        return 429 if response.code == "capacity_exceeded" else 503
    return {"invalid_request": 400, "idempotency_key_reused": 409, "no_such_transaction": 404}.get(
        response.code or "", 422
    )


class PSPSimApp:
    """RSGI application routing to one `SimulatedPSP` per name."""

    def __init__(self, psps: dict[str, SimulatedPSP]) -> None:
        self.psps = psps

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        try:
            status, headers, body = await self._handle(scope, proto)
        except ResponseLost:
            status, headers, body = 504, _JSON_HEADERS, _ENCODER.encode({"error": "response_lost"})
        proto.response_bytes(status, headers, body)

    async def _handle(self, scope: Any, proto: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        parts = [p for p in scope.path.split("/") if p]
        if parts == ["health"]:
            return 200, _JSON_HEADERS, b'{"status":"ok"}'
        if len(parts) < 3 or parts[0] != "v1" or parts[1] not in self.psps:
            return _problem(404, "not_found", "no such route")
        psp = self.psps[parts[1]]
        action = parts[2]
        if scope.method == "GET" and action == "status" and len(parts) == 3:
            query = {k: v[0] for k, v in parse_qs(scope.query_string).items()}
            found = await psp.status(
                reference=query.get("reference"),
                psp_reference=query.get("psp_reference"),
                idempotency_key=query.get("idempotency_key"),
            )
            if found is None:
                return _problem(404, "no_such_transaction", "no transaction matches the query")
            return 200, _JSON_HEADERS, _ENCODER.encode(found)
        if scope.method == "GET" and action == "settlement" and len(parts) == 4 and parts[3].endswith(".csv"):
            try:
                day = date.fromisoformat(parts[3].removesuffix(".csv"))
            except ValueError:
                return _problem(400, "invalid_request", "settlement day must be YYYY-MM-DD")
            return 200, [("content-type", "text/csv")], psp.settlement_csv(day).encode()
        if scope.method != "POST" or len(parts) != 3:
            return _problem(404, "not_found", "no such route")
        key = scope.headers.get("idempotency-key") or ""
        raw = await proto()
        if len(raw) > BODY_BYTES_MAX:
            return _problem(413, "invalid_request", f"body larger than {BODY_BYTES_MAX} bytes")
        try:
            if action == "authorize":
                a = _AUTHORIZE.decode(raw)
                response = await psp.authorize(
                    reference=a.reference,
                    amount=a.amount,
                    currency=a.currency,
                    token=a.token,
                    idempotency_key=key,
                )
            elif action == "capture":
                c = _CAPTURE.decode(raw)
                response = await psp.capture(
                    psp_reference=c.psp_reference, amount=c.amount, final=c.final, idempotency_key=key
                )
            elif action == "void":
                v = _VOID.decode(raw)
                response = await psp.void(psp_reference=v.psp_reference, idempotency_key=key)
            elif action == "refund":
                r = _REFUND.decode(raw)
                response = await psp.refund(
                    psp_reference=r.psp_reference, amount=r.amount, idempotency_key=key
                )
            else:
                return _problem(404, "not_found", "no such route")
        except msgspec.DecodeError as exc:
            return _problem(400, "invalid_request", str(exc))
        return _status_code(response), _JSON_HEADERS, _ENCODER.encode(response)


def _problem(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = {"outcome": "error", "code": code, "message": message, "retryable": False}
    return status, _JSON_HEADERS, _ENCODER.encode(body)


def build_app(
    profiles: Sequence[PSPProfile] | None = None,
    *,
    seed: int = 0,
    time_scale: float = 1.0,
    transactions_max: int = TRANSACTIONS_MAX_DEFAULT,
) -> PSPSimApp:
    chosen = list(profiles) if profiles else list(DEFAULT_PROFILES.values())
    return PSPSimApp(
        {
            p.name: SimulatedPSP(p, seed=seed, time_scale=time_scale, transactions_max=transactions_max)
            for p in chosen
        }
    )


def app_from_env() -> PSPSimApp:
    """Factory used by granian's worker: `serve()` hands it the settings in `CONFIG_ENV`, the one channel
    into granian's worker process. Not an operator setting: operators give `gateway psp-sim` flags or the
    `[psp]` section of a config file (cli.py), validated there."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return build_app()
    config = msgspec.json.decode(raw.encode(), type=SimConfig)
    return build_app(
        config.profiles,
        seed=config.seed,
        time_scale=config.time_scale,
        transactions_max=config.transactions_max,
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 8700,
    profiles: Sequence[PSPProfile | str] | None = None,
    *,
    seed: int = 0,
    time_scale: float = 1.0,
    transactions_max: int = TRANSACTIONS_MAX_DEFAULT,
    log_access: bool = False,
) -> None:
    """Serve the simulator until interrupted (blocking).

    One granian worker, on purpose: the simulated processors keep their state in memory, and
    several workers would each keep their own copy of it.
    """
    from granian.constants import Interfaces
    from granian.server import Server

    resolved: list[PSPProfile] = []
    for p in profiles or list(DEFAULT_PROFILES.values()):
        if isinstance(p, str):
            if p not in DEFAULT_PROFILES:
                raise ValueError(f"unknown PSP profile {p!r}; known: {', '.join(DEFAULT_PROFILES)}")
            p = DEFAULT_PROFILES[p]
        resolved.append(p)
    config = SimConfig(profiles=resolved, seed=seed, time_scale=time_scale, transactions_max=transactions_max)
    os.environ[CONFIG_ENV] = msgspec.json.encode(config).decode()
    Server(
        "gateway.psp_sim.http:app_from_env",
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        workers=1,
        factory=True,
        log_access=log_access,
    ).serve()
