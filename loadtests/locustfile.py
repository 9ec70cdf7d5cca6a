"""Merchant traffic for the gateway, as locust scenarios.

Each simulated user is one merchant integration. Scenarios, by weight:
- create a payment with a fresh Idempotency-Key (the common case);
- create, lose the answer (a timeout, or we pretend it was lost), retry with the same key and body, and
  check the retry is a replay of the same payment;
- create, then poll its status a bounded number of times;
- capture, void and refund, each on a payment of its own; every one of these is skipped for the rest
  of the run once its endpoint answers 404 for a payment we just created (endpoint not built yet).

Environment:
- GATEWAY_API_KEYS: comma-separated merchant API keys (default `sk_test_demo`, the `--demo` merchant);
  users are spread across them.
- LOCUST_POLL_MAX: status polls per payment (default 5).

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8080 --csv out
"""

from __future__ import annotations

import itertools
import json
import os
import random
import string
import time
import uuid
from typing import Any, ClassVar

from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser, ResponseContextManager

API_KEYS = [k.strip() for k in os.environ.get("GATEWAY_API_KEYS", "sk_test_demo").split(",") if k.strip()]
POLL_MAX = int(os.environ.get("LOCUST_POLL_MAX", "5"))
POLL_INTERVAL_S = 0.1
CARDS = [f"tok_card_{i:05d}" for i in range(5000)]
CURRENCIES = [("USD", 0.7), ("EUR", 0.15), ("GBP", 0.1), ("JPY", 0.05)]
# Statuses a payment may hold while the async path has not reached the state an action needs yet.
AUTHORIZED = {"authorized", "requires_capture"}
CAPTURED = {"captured", "succeeded", "partially_captured"}
TERMINAL = {"failed", "canceled", "refunded", "partially_refunded", *CAPTURED}
_key_cycle = itertools.cycle(API_KEYS)


class MissingEndpoints:
    """Endpoints found to answer 404 for a payment that exists; shared by every user of the run."""

    missing: ClassVar[set[str]] = set()

    @classmethod
    def mark(cls, name: str) -> None:
        if name not in cls.missing:
            cls.missing.add(name)
            print(f"locustfile: {name} answered 404 for an existing payment; skipping it from now on")


def payment_body(capture: bool = True) -> dict[str, Any]:
    currency = random.choices([c for c, _ in CURRENCIES], [w for _, w in CURRENCIES])[0]
    card = CARDS[min(int(random.paretovariate(1.2)) - 1, len(CARDS) - 1)]
    amount = max(1, int(random.lognormvariate(7.8, 1.0)))
    if currency == "JPY":
        amount = max(1, amount // 100)
    return {
        "amount": amount,
        "currency": currency,
        "payment_method": card,
        "capture": capture,
        "description": "locust order",
        # Letters only: a long run of digits in any field could look like a card number and be refused.
        "metadata": {"order_id": "ord_" + "".join(random.choices(string.ascii_lowercase, k=16))},
        "customer": {
            "email": f"buyer{random.randint(0, 99_999)}@example.com",
            "ip": f"10.0.{random.randint(0, 255)}.{random.randint(1, 254)}",
            "device_id": f"dev_{random.randint(0, 99_999)}",
            "country": random.choice(["US", "US", "US", "GB", "DE", "FR"]),
        },
    }


class Merchant(FastHttpUser):
    wait_time = between(0.05, 0.3)
    network_timeout = 5.0
    connection_timeout = 5.0

    def on_start(self) -> None:
        self.api_key = next(_key_cycle)
        self.auth = {"Authorization": f"Bearer {self.api_key}"}

    # ------------------------------------------------------------------------------------- helpers

    def _create(
        self, body: dict[str, Any], key: str | None, name: str = "POST /v1/payments"
    ) -> dict[str, Any] | None:
        """Create a payment; 201 and 402 (risk decline) are correct answers, anything else fails."""
        headers = dict(self.auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        with self.client.post(
            "/v1/payments", json=body, headers=headers, name=name, catch_response=True
        ) as resp:
            return self._expect(resp, (200, 201, 402))

    def _expect(self, resp: ResponseContextManager, ok: tuple[int, ...]) -> dict[str, Any] | None:
        if resp.status_code not in ok:
            resp.failure(f"status {resp.status_code}: {(resp.text or '')[:200]}")
            return None
        try:
            data = json.loads(resp.text or "null")
        except ValueError:
            resp.failure("response is not JSON")
            return None
        resp.success()
        return data if isinstance(data, dict) else None

    def _get(self, payment_id: str) -> dict[str, Any] | None:
        with self.client.get(
            f"/v1/payments/{payment_id}", headers=self.auth, name="GET /v1/payments/{id}", catch_response=True
        ) as resp:
            return self._expect(resp, (200,))

    def _wait_for(self, payment_id: str, wanted: set[str]) -> dict[str, Any] | None:
        """Poll until the payment reaches one of `wanted`; None after POLL_MAX polls or a terminal miss."""
        for _ in range(POLL_MAX):
            payment = self._get(payment_id)
            if payment is None:
                return None
            if payment.get("status") in wanted:
                return payment
            if payment.get("status") in TERMINAL:
                return None
            time.sleep(POLL_INTERVAL_S)
        return None

    def _action(self, name: str, path: str, body: dict[str, Any] | None) -> dict[str, Any] | None:
        """POST an action; a 404 marks the endpoint missing (the payment exists: we just created it)."""
        if name in MissingEndpoints.missing:
            return None
        headers = {**self.auth, "Idempotency-Key": uuid.uuid4().hex}
        with self.client.post(path, json=body or {}, headers=headers, name=name, catch_response=True) as resp:
            if resp.status_code in (404, 405):
                MissingEndpoints.mark(name)
                resp.success()
                return None
            # 202: the operation is accepted and the PSP call happens on the async path.
            return self._expect(resp, (200, 201, 202))

    # ------------------------------------------------------------------------------------- scenarios

    @task(10)
    def create_with_idempotency_key(self) -> None:
        self._create(payment_body(), uuid.uuid4().hex)

    @task(2)
    def retry_same_key_after_timeout(self) -> None:
        body = payment_body()
        key = uuid.uuid4().hex
        first: dict[str, Any] | None = None
        try:
            first = self._create(body, key, name="POST /v1/payments [first try]")
        except Exception:  # noqa: BLE001 - a timeout is exactly the case this scenario retries
            first = None
        headers = {**self.auth, "Idempotency-Key": key}
        with self.client.post(
            "/v1/payments", json=body, headers=headers, name="POST /v1/payments [retry]", catch_response=True
        ) as resp:
            if resp.status_code == 409:
                resp.success()  # the first attempt is still in flight: the documented answer
                return
            retried = self._expect(resp, (200, 201, 402))
            if retried is None or first is None:
                return
            if resp.headers.get("Idempotent-Replayed", "").lower() != "true":
                resp.failure("retry with the same key was not marked Idempotent-Replayed")
            elif first.get("id") != retried.get("id") or first.get("error") != retried.get("error"):
                resp.failure("retry with the same key returned a different answer")

    @task(3)
    def create_then_poll_status(self) -> None:
        payment = self._create(payment_body(), uuid.uuid4().hex)
        if payment and "id" in payment:
            self._wait_for(payment["id"], TERMINAL | AUTHORIZED)

    @task(1)
    def authorize_then_capture(self) -> None:
        if "POST /v1/payments/{id}/capture" in MissingEndpoints.missing:
            return
        body = payment_body(capture=False)
        payment = self._create(body, uuid.uuid4().hex)
        if payment and "id" in payment and self._wait_for(payment["id"], AUTHORIZED):
            amount = body["amount"] if random.random() < 0.7 else max(1, body["amount"] // 2)
            self._action(
                "POST /v1/payments/{id}/capture", f"/v1/payments/{payment['id']}/capture", {"amount": amount}
            )

    @task(1)
    def authorize_then_void(self) -> None:
        if "POST /v1/payments/{id}/void" in MissingEndpoints.missing:
            return
        payment = self._create(payment_body(capture=False), uuid.uuid4().hex)
        if payment and "id" in payment and self._wait_for(payment["id"], AUTHORIZED):
            self._action("POST /v1/payments/{id}/void", f"/v1/payments/{payment['id']}/void", None)

    @task(1)
    def capture_then_refund(self) -> None:
        if "POST /v1/payments/{id}/refunds" in MissingEndpoints.missing:
            return
        body = payment_body(capture=True)
        payment = self._create(body, uuid.uuid4().hex)
        if payment and "id" in payment and self._wait_for(payment["id"], CAPTURED):
            amount = body["amount"] if random.random() < 0.5 else max(1, body["amount"] // 3)
            self._action(
                "POST /v1/payments/{id}/refunds", f"/v1/payments/{payment['id']}/refunds", {"amount": amount}
            )


@events.test_stop.add_listener
def _report_missing(**_: Any) -> None:
    if MissingEndpoints.missing:
        print(f"locustfile: endpoints not available in this build: {sorted(MissingEndpoints.missing)}")
