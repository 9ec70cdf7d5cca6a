"""The baseline: what a competent team would build first in plain Python.

FastAPI + uvicorn (httptools, uvloop) + pydantic, with the same contract as the gateway's
`POST /v1/payments`: bearer auth, pydantic validation, per-merchant idempotency (replay, 400 on a
different body, 409 while in flight), a per-merchant token-bucket rate limit, the risk decision, and a
durable write before the 201.

Risk: the plain-Python reference implementation at `tests/reference/risk_ref.py` is used when it
exists; otherwise a simple equivalent runs here (blocklists on card token, email, IP and device, a
per-card velocity window and an amount rule).

Durability: group commit, the same promise the gateway makes. Each accepted payment is appended to a
pending batch; one flusher task writes the batch to an append-only file and calls fsync in a worker
thread, then answers every request of that batch. A batch closes after `group_commit_interval_us` or
`group_commit_records_max` records, whichever comes first, so no 201 leaves before its record is on
disk.

Configuration is a JSON file named by the environment variable `BASELINE_CONFIG`:
`{"merchants": {"sk_...": "mer_..."}, "blocklist": {"payment_method": [...], "email": [...],
"ip": [...], "device_id": [...]}, "velocity_window_s": 60, "velocity_max": 10, "wal_path": "...",
"rate_limit_per_s": 1000000}`.

Run: uvicorn --app-dir bench baseline_app:app --loop uvloop --http httptools
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

REPO = Path(__file__).resolve().parent.parent
REFERENCE_RISK = REPO / "tests" / "reference" / "risk_ref.py"
MODEL_PATH = REPO / "python" / "gateway" / "risk" / "model.json"
CURRENCIES = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "CAD": 2, "AUD": 2, "CHF": 2, "SEK": 2}
PAN_RE = re.compile(r"(?:\d[ -]?){13,19}")
AMOUNT_MAX = 99_999_999
IDEMPOTENCY_KEY_LEN_MAX = 255


class Customer(BaseModel):
    email: str | None = Field(default=None, max_length=254)
    ip: str | None = Field(default=None, max_length=45)
    device_id: str | None = Field(default=None, max_length=128)
    country: str | None = Field(default=None, min_length=2, max_length=2)


class PaymentCreate(BaseModel):
    amount: int = Field(gt=0, le=AMOUNT_MAX)
    currency: str = Field(min_length=3, max_length=3)
    payment_method: str = Field(min_length=4, max_length=64, pattern=r"^tok_[A-Za-z0-9_]+$")
    capture: bool = True
    description: str | None = Field(default=None, max_length=1000)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=50)
    customer: Customer | None = None


def _load_config() -> dict[str, Any]:
    path = os.environ.get("BASELINE_CONFIG")
    config: dict[str, Any] = {}
    if path:
        config = json.loads(Path(path).read_text())
    config.setdefault("merchants", {})
    config["merchants"].setdefault("sk_test_demo", "mer_demo")
    config.setdefault("blocklist", {})
    config.setdefault("velocity_window_s", 60)
    config.setdefault("velocity_max", 10)
    config.setdefault("wal_path", "/tmp/baseline-wal.log")
    config.setdefault("rate_limit_per_s", 1_000_000)
    config.setdefault("group_commit_interval_us", 1000)
    config.setdefault("group_commit_records_max", 256)
    return config


class SimpleRisk:
    """Fallback decision logic used only when the reference implementation is absent."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.blocklist = {field: set(values) for field, values in config["blocklist"].items()}
        self.window_s = float(config["velocity_window_s"])
        self.velocity_max = {
            "payment_method": int(config["velocity_max"]),
            "device_id": int(config.get("device_velocity_max", config["velocity_max"])),
        }
        self.seen: dict[tuple[str, str], deque[float]] = {}

    def decide(self, merchant_id: str, payment: dict[str, Any]) -> tuple[bool, list[str]]:
        fired: list[str] = []
        customer = payment.get("customer") or {}
        values = {"payment_method": payment["payment_method"], **customer}
        for field, blocked in self.blocklist.items():
            if values.get(field) in blocked:
                fired.append(f"blocklist:{field}")
        now = time.monotonic()
        for field, limit in self.velocity_max.items():
            value = values.get(field)
            if value is None:
                continue
            window = self.seen.setdefault((field, value), deque())
            while window and now - window[0] > self.window_s:
                window.popleft()
            window.append(now)
            if len(window) > limit:
                fired.append(f"velocity:{field}")
        if payment["amount"] > 5_000_000 and customer.get("country") not in (None, "US"):
            fired.append("rule:large_foreign_amount")
        return (not fired, fired)


class ReferenceRisk:
    """tests/reference/risk_ref.py's Engine with the benchmark's lists, rules and the shipped model.

    The rules mirror what the benchmark traffic exercises: blocklisted cards and emails, and per-card
    and per-device velocity limits; the XGBoost model scores every request as the gateway's would.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        spec = importlib.util.spec_from_file_location("risk_ref", REFERENCE_RISK)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["risk_ref"] = module
        spec.loader.exec_module(module)
        engine = module.Engine()
        kinds = {"payment_method": "card", "email": "email", "ip": "ip", "device_id": "device"}
        attrs = {"payment_method": "card", "email": "email", "ip": "ip", "device_id": "device_id"}
        rules = []
        for field, values in config["blocklist"].items():
            if field not in kinds or not values:
                continue
            lst = engine.create_list(f"blocked_{kinds[field]}", kinds[field])
            for v in values:
                lst.add(v)
            rules.append(f"blocklisted_{kinds[field]}: block if :{attrs[field]}: in @blocked_{kinds[field]}")
        device_max = int(config.get("device_velocity_max", config["velocity_max"]))
        rules.append(f"device_velocity: block if :device_count_1m: > {device_max}")
        rules.append(f"card_velocity: block if :card_count_1m: > {int(config['velocity_max'])}")
        engine.set_global_rules(engine.compile_rules("\n".join(rules) + "\n", 1))
        if MODEL_PATH.exists():
            engine.load_model(MODEL_PATH.read_bytes())
        self.engine = engine

    def decide(self, merchant_id: str, payment: dict[str, Any]) -> tuple[bool, list[str]]:
        customer = payment.get("customer") or {}
        request = {
            "merchant_id": merchant_id,
            "amount": payment["amount"],
            "currency": payment["currency"],
            "card": payment["payment_method"],
        }
        for src, dst in (
            ("email", "email"),
            ("ip", "ip"),
            ("device_id", "device_id"),
            ("country", "customer_country"),
        ):
            if customer.get(src):
                request[dst] = customer[src]
        decision = self.engine.decide(request, int(time.time() * 1000))
        return decision["action"] != "block", [r["name"] for r in decision["matched_rules"]]


class GroupCommitLog:
    """Append-only file with batched fsync; `append` returns once the record is durable."""

    def __init__(self, path: str, interval_us: int, records_max: int) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.interval_s = interval_us / 1e6
        self.records_max = records_max
        self.pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._flusher())

    async def append(self, record: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((record, future))
        if len(self.pending) >= self.records_max:
            self.wakeup.set()
        await future

    def _write_and_sync(self, data: bytes) -> None:
        os.write(self.fd, data)
        os.fsync(self.fd)

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
            self.wakeup.clear()
            if not self.pending:
                continue
            batch, self.pending = self.pending, []
            try:
                await loop.run_in_executor(None, self._write_and_sync, b"".join(r for r, _ in batch))
            except OSError as exc:
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)


CONFIG = _load_config()
RISK: SimpleRisk | ReferenceRisk = ReferenceRisk(CONFIG) if REFERENCE_RISK.exists() else SimpleRisk(CONFIG)
MERCHANTS: dict[str, str] = CONFIG["merchants"]
LOG = GroupCommitLog(
    CONFIG["wal_path"], CONFIG["group_commit_interval_us"], CONFIG["group_commit_records_max"]
)
IDEMPOTENCY: dict[tuple[str, str], tuple[str, int, bytes] | None] = {}
PAYMENTS: dict[str, tuple[str, bytes]] = {}
BUCKETS: dict[str, list[float]] = {}


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    LOG.start()
    yield


app = FastAPI(title="baseline payment gateway", lifespan=_lifespan)


def _error(status: int, type_: str, code: str, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "code": code, "message": message, "param": param}}
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _allow(merchant_id: str) -> bool:
    rate = float(CONFIG["rate_limit_per_s"])
    now = time.monotonic()
    bucket = BUCKETS.setdefault(merchant_id, [rate, now])
    bucket[0] = min(rate, bucket[0] + (now - bucket[1]) * rate)
    bucket[1] = now
    if bucket[0] < 1.0:
        return False
    bucket[0] -= 1.0
    return True


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/v1/payments")
async def create_payment(
    request: Request,
    authorization: str | None = Header(default=None),
    idempotency_key: str | None = Header(default=None),
) -> Response:
    key = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
    merchant_id = MERCHANTS.get(key or "")
    if merchant_id is None:
        return _error(401, "authentication_error", "invalid_api_key", "Invalid API key.")
    raw = await request.body()
    if idempotency_key is not None and len(idempotency_key) > IDEMPOTENCY_KEY_LEN_MAX:
        return _error(400, "invalid_request_error", "parameter_invalid", "Idempotency-Key too long.")
    fingerprint = hashlib.sha256(raw).hexdigest()
    slot = (merchant_id, idempotency_key) if idempotency_key else None
    if slot is not None:
        if slot in IDEMPOTENCY:
            stored = IDEMPOTENCY[slot]
            if stored is None:
                return _error(409, "idempotency_error", "request_in_flight", "A request is in flight.")
            if stored[0] != fingerprint:
                return _error(400, "idempotency_error", "parameters_mismatch", "Key reused.")
            return Response(
                stored[2],
                status_code=stored[1],
                media_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        IDEMPOTENCY[slot] = None
    status, body = await _create(merchant_id, raw)
    if slot is not None:
        if status == 429:
            del IDEMPOTENCY[slot]
        else:
            IDEMPOTENCY[slot] = (fingerprint, status, body)
    headers = {"Retry-After": "1"} if status == 429 else None
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _create(merchant_id: str, raw: bytes) -> tuple[int, bytes]:
    def err(status: int, type_: str, code: str, message: str, param: str | None = None) -> tuple[int, bytes]:
        error = {"type": type_, "code": code, "message": message, "param": param}
        return status, json.dumps({"error": error}).encode()

    if not _allow(merchant_id):
        return err(429, "rate_limit_error", "rate_limited", "Too many requests.")
    if PAN_RE.search(raw.decode("utf-8", "replace")):
        return err(400, "invalid_request_error", "card_number_rejected", "Raw card numbers are refused.")
    try:
        payment = PaymentCreate.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        return err(400, "invalid_request_error", "parameter_invalid", first["msg"], param)
    if payment.currency not in CURRENCIES:
        return err(400, "invalid_request_error", "currency_invalid", "Unknown currency.", "currency")
    data = payment.model_dump()
    approved, fired = RISK.decide(merchant_id, data)
    payment_id = "pay_" + uuid.uuid4().hex[:24]
    status_name = "processing" if approved else "failed"
    record = {
        "id": payment_id,
        "object": "payment",
        "merchant": merchant_id,
        "status": status_name,
        "amount": payment.amount,
        "currency": payment.currency,
        "capture": payment.capture,
        "payment_method": payment.payment_method,
        "description": payment.description,
        "metadata": payment.metadata,
        "created": int(time.time()),
    }
    if not approved:
        return err(402, "card_error", "payment_declined", "Declined by risk: " + ",".join(fired))
    body = json.dumps(record).encode()
    await LOG.append(body + b"\n")
    PAYMENTS[payment_id] = (merchant_id, body)
    return 201, body


@app.get("/v1/payments/{payment_id}")
async def get_payment(payment_id: str, authorization: str | None = Header(default=None)) -> Response:
    key = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
    merchant_id = MERCHANTS.get(key or "")
    if merchant_id is None:
        return _error(401, "authentication_error", "invalid_api_key", "Invalid API key.")
    stored = PAYMENTS.get(payment_id)
    if stored is None or stored[0] != merchant_id:
        return _error(404, "invalid_request_error", "resource_missing", "No such payment.", "id")
    return Response(stored[1], media_type="application/json")
