"""Signed webhooks against a real gateway process and a real HTTP receiver on loopback.

The receiver is a threaded `http.server` in this process: it records every request (headers and raw
body) and answers 500 to the first N deliveries of an event when told to. Signatures are checked
with the public `gateway.domain.signature.verify_signature`, as a merchant would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from gateway.domain.signature import verify_signature
from support import Gateway, auth, create_merchant

WEBHOOK_ENV = {
    "GATEWAY_PSP_TIME_SCALE": "0.01",
    "GATEWAY_PSPS": "psp_a,psp_b",
    "GATEWAY_RECONCILE_INTERVAL_MS": "100",
    "GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1",
    "GATEWAY_WEBHOOK_RETRY_BASE_MS": "100",
    "GATEWAY_WEBHOOK_RETRY_MAX_MS": "400",
    "GATEWAY_WEBHOOK_POLL_MS": "50",
    "GATEWAY_WEBHOOK_ATTEMPTS_MAX": "4",
    "GATEWAY_WEBHOOK_TIMEOUT_MS": "2000",
}
WAIT = {"Prefer": "wait=5000"}


class Received:
    def __init__(self, headers: dict[str, str], body: bytes, status: int) -> None:
        self.headers = headers
        self.body = body
        self.status = status
        self.event = json.loads(body)


class Receiver:
    """Records every POST; `fail_first[event_type] = n` answers 500 to the first n of each such event."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.fail_first: dict[str, int] = {}
        # event type -> seconds the first delivery of each such event waits before answering
        self.hang_first: dict[str, float] = {}
        self.status_all: int | None = None
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                event = json.loads(body)
                with receiver._lock:
                    n = receiver._seen[event["id"]] = receiver._seen.get(event["id"], 0) + 1
                    status = receiver.status_all or (
                        500 if n <= receiver.fail_first.get(event["type"], 0) else 200)
                    receiver.requests.append(Received({k.lower(): v for k, v in self.headers.items()}, body, status))
                if n == 1 and event["type"] in receiver.hang_first:
                    time.sleep(receiver.hang_first[event["type"]])
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            # Dispatchers send up to 32 requests at once each; http.server's default backlog is 5.
            request_queue_size = 256

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def for_payment(self, pid: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.event["data"]["object"]["id"] == pid]

    def wait_for(self, pid: str, done: Callable[[list[Received]], bool], timeout_s: float = 20) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.for_payment(pid)
            if done(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got for {pid}: {[(r.event['type'], r.status) for r in got]}")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def delivered_types(got: list[Received]) -> list[str]:
    return [r.event["type"] for r in got if r.status == 200]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("webhooks") / "data", extra_env=WEBHOOK_ENV).start()
    yield g
    g.stop()


def new_merchant(g: Gateway, name: str) -> str:
    return create_merchant(g.data_dir, name)["api_key"]


def add_endpoint(g: Gateway, key: str, url: str, events: list[str] | None = None) -> dict:
    body: dict = {"url": url}
    if events is not None:
        body["enabled_events"] = events
    r = httpx.post(f"{g.url}/v1/webhook_endpoints", headers=auth(key), json=body, timeout=10)
    assert r.status_code == 201, r.text
    return dict(r.json())


def create(g: Gateway, key: str, token: str = "tok_visa", capture: bool = False) -> str:
    r = httpx.post(f"{g.url}/v1/payments", headers=auth(key), timeout=10,
                   json={"amount": 1000, "currency": "USD", "payment_method": token, "capture": capture})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def settled(g: Gateway, key: str, pid: str) -> dict:
    r = httpx.get(f"{g.url}/v1/payments/{pid}", headers={**auth(key), **WAIT}, timeout=15)
    assert r.status_code == 200, r.text
    return dict(r.json())


def op(g: Gateway, key: str, pid: str, kind: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(f"{g.url}/v1/payments/{pid}/{kind}", headers={**auth(key), **WAIT}, json=body or {},
                      timeout=15)


def event(g: Gateway, key: str, event_id: str) -> dict:
    r = httpx.get(f"{g.url}/v1/events/{event_id}", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_signed(got: list[Received], secret: str) -> None:
    for r in got:
        verify_signature(r.body, r.headers["gateway-signature"], secret, tolerance_s=300)
        assert r.headers["gateway-event-id"] == r.event["id"]
        assert r.headers["content-type"] == "application/json"


def test_endpoint_is_created_with_its_secret_once_listed_without_it_and_deleted(gw: Gateway, receiver: Receiver) -> None:
    key = new_merchant(gw, "Endpoint Shop")
    other = new_merchant(gw, "Other Shop")
    ep = add_endpoint(gw, key, receiver.url, ["payment.captured", "payment.refunded"])
    assert ep["id"].startswith("we_") and ep["secret"].startswith("whsec_") and len(ep["secret"]) > 40
    assert ep["enabled_events"] == ["payment.captured", "payment.refunded"] and ep["url"] == receiver.url
    listed = httpx.get(f"{gw.url}/v1/webhook_endpoints", headers=auth(key), timeout=10).json()
    assert [e["id"] for e in listed["data"]] == [ep["id"]]
    assert "secret" not in listed["data"][0]
    assert httpx.get(f"{gw.url}/v1/webhook_endpoints", headers=auth(other), timeout=10).json()["data"] == []
    # Another merchant's endpoint is not found, not deleted.
    assert httpx.delete(f"{gw.url}/v1/webhook_endpoints/{ep['id']}", headers=auth(other), timeout=10).status_code == 404
    r = httpx.delete(f"{gw.url}/v1/webhook_endpoints/{ep['id']}", headers=auth(key), timeout=10)
    assert r.status_code == 200 and r.json() == {"id": ep["id"], "object": "webhook_endpoint", "deleted": True}
    assert httpx.delete(f"{gw.url}/v1/webhook_endpoints/{ep['id']}", headers=auth(key), timeout=10).status_code == 404
    assert httpx.get(f"{gw.url}/v1/webhook_endpoints", headers=auth(key), timeout=10).json()["data"] == []
    assert ep["secret"] not in gw.log()


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"url": "ftp://example.com/hooks"}, "url_invalid", "url"),
        ({"url": "https://example.com/" + "a" * 2048}, "url_invalid", "url"),
        ({"url": "https://user:pw@example.com/"}, "url_invalid", "url"),
        ({}, "parameter_missing", "url"),
        ({"url": "https://example.com/h", "enabled_events": ["payment.exploded"]}, "parameter_invalid",
         "enabled_events"),
        ({"url": "https://example.com/h", "enabled_events": []}, "parameter_invalid", "enabled_events"),
        ({"url": "https://example.com/h", "colour": "red"}, "parameter_unknown", "colour"),
    ],
)
def test_invalid_endpoints_are_refused_with_a_clear_400(gw: Gateway, body: dict, code: str, param: str) -> None:
    r = httpx.post(f"{gw.url}/v1/webhook_endpoints", headers=auth(), json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == param


def test_endpoints_per_merchant_are_limited(gw: Gateway) -> None:
    key = new_merchant(gw, "Many Endpoints Shop")
    for i in range(16):
        add_endpoint(gw, key, f"https://hooks.example.com/{i}")
    r = httpx.post(f"{gw.url}/v1/webhook_endpoints", headers=auth(key), json={"url": "https://x.example.com/"},
                   timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "endpoints_limit_reached"
    assert "16" in r.json()["error"]["message"]


def test_authorize_capture_refund_events_arrive_signed_and_in_order(gw: Gateway, receiver: Receiver) -> None:
    key = new_merchant(gw, "Story Shop")
    ep = add_endpoint(gw, key, receiver.url)
    pid = create(gw, key)
    assert settled(gw, key, pid)["status"] == "authorized"
    assert op(gw, key, pid, "capture").status_code == 200
    assert op(gw, key, pid, "refunds", {"amount": 300}).status_code == 200
    assert op(gw, key, pid, "refunds").status_code == 200
    expected = ["payment.authorized", "payment.captured", "payment.partially_refunded", "payment.refunded"]
    got = receiver.wait_for(pid, lambda g: len(delivered_types(g)) == 4)
    assert delivered_types(got) == expected
    assert_signed(got, ep["secret"])
    # Each event carries the payment as it was at that change.
    statuses = [r.event["data"]["object"]["status"] for r in got]
    assert statuses == ["authorized", "captured", "partially_refunded", "refunded"]
    assert [r.event["data"]["object"]["amount_refunded"] for r in got] == [0, 0, 300, 1000]
    assert len({r.event["id"] for r in got}) == 4
    listed = httpx.get(f"{gw.url}/v1/events", params={"payment": pid}, headers=auth(key), timeout=10).json()
    assert [e["id"] for e in listed["data"]] == [r.event["id"] for r in got]
    detail = event(gw, key, got[0].event["id"])
    assert detail["type"] == "payment.authorized"
    assert detail["deliveries"] == [{**detail["deliveries"][0], "endpoint": ep["id"], "status": "delivered",
                                     "attempts": 1, "last_status_code": 200}]
    # Scoped per merchant.
    assert httpx.get(f"{gw.url}/v1/events/{got[0].event['id']}", headers=auth(), timeout=10).status_code == 404


def test_declines_and_failed_operations_are_events_too(gw: Gateway, receiver: Receiver) -> None:
    key = new_merchant(gw, "Decline Shop")
    add_endpoint(gw, key, receiver.url, ["payment.failed", "payment.canceled"])
    declined = create(gw, key, token="tok_decline_stolen")
    voided = create(gw, key)
    assert settled(gw, key, declined)["status"] == "failed"
    assert settled(gw, key, voided)["status"] == "authorized"
    assert op(gw, key, voided, "void").status_code == 200
    assert delivered_types(receiver.wait_for(declined, lambda g: len(g) >= 1)) == ["payment.failed"]
    # Only the subscribed types: the authorization of `voided` is not sent to this endpoint.
    assert delivered_types(receiver.wait_for(voided, lambda g: len(g) >= 1)) == ["payment.canceled"]


def test_a_failing_receiver_gets_the_same_event_again_and_later_events_wait_for_it(
    gw: Gateway, receiver: Receiver
) -> None:
    key = new_merchant(gw, "Retry Shop")
    ep = add_endpoint(gw, key, receiver.url)
    receiver.fail_first["payment.authorized"] = 2
    try:
        pid = create(gw, key, capture=True)
        assert settled(gw, key, pid)["status"] == "captured"
        got = receiver.wait_for(pid, lambda g: len(delivered_types(g)) == 2)
    finally:
        receiver.fail_first.pop("payment.authorized")
    assert [(r.event["type"], r.status) for r in got] == [
        ("payment.authorized", 500), ("payment.authorized", 500), ("payment.authorized", 200),
        ("payment.captured", 200)]
    assert len({r.event["id"] for r in got[:3]}) == 1  # the same event, to de-duplicate by its id
    assert_signed(got, ep["secret"])
    detail = event(gw, key, got[0].event["id"])["deliveries"][0]
    assert (detail["status"], detail["attempts"], detail["last_status_code"]) == ("delivered", 3, 200)


def test_a_receiver_slower_than_the_timeout_gets_the_event_again(gw: Gateway, receiver: Receiver) -> None:
    key = new_merchant(gw, "Slow Receiver Shop")
    ep = add_endpoint(gw, key, receiver.url, ["payment.authorized"])
    receiver.hang_first["payment.authorized"] = 3.0  # the gateway gives up after 2 s
    try:
        pid = create(gw, key)
        assert settled(gw, key, pid)["status"] == "authorized"
        got = receiver.wait_for(pid, lambda g: len(g) >= 2)
    finally:
        receiver.hang_first.pop("payment.authorized")
    assert len({r.event["id"] for r in got}) == 1
    assert_signed(got, ep["secret"])
    deadline = time.monotonic() + 10
    while (d := event(gw, key, got[0].event["id"])["deliveries"][0])["status"] == "pending":
        assert time.monotonic() < deadline, d
        time.sleep(0.05)
    assert (d["status"], d["attempts"], d["last_status_code"], d["last_error"]) == ("delivered", 2, 200, None)


def test_an_unreachable_endpoint_ends_failed_after_the_attempts_limit(gw: Gateway, receiver: Receiver) -> None:
    from support import free_port

    key = new_merchant(gw, "Dead Endpoint Shop")
    add_endpoint(gw, key, f"http://127.0.0.1:{free_port()}/nobody-listens", ["payment.authorized"])
    pid = create(gw, key)
    assert settled(gw, key, pid)["status"] == "authorized"
    events = httpx.get(f"{gw.url}/v1/events", params={"payment": pid}, headers=auth(key), timeout=10).json()["data"]
    assert [e["type"] for e in events] == ["payment.authorized"]
    deadline = time.monotonic() + 20
    while True:
        d = event(gw, key, events[0]["id"])["deliveries"][0]
        if d["status"] != "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (d["status"], d["attempts"], d["last_status_code"]) == ("failed", 4, None)
    assert d["last_error"] == "ConnectError"


def test_events_pending_at_a_sigkill_are_delivered_after_the_restart(tmp_path: Path, receiver: Receiver) -> None:
    data = tmp_path / "data"
    key = create_merchant(data, "Crash Shop")["api_key"]
    # Retries never run out while the receiver is down: every event must still be pending at the kill.
    env = {**WEBHOOK_ENV, "GATEWAY_WEBHOOK_ATTEMPTS_MAX": "50"}
    g = Gateway(data, extra_env=env).start()
    try:
        ep = add_endpoint(g, key, receiver.url)
        receiver.status_all = 503
        try:
            ids = [create(g, key, capture=True) for _ in range(5)]
            for pid in ids:
                assert settled(g, key, pid)["status"] == "captured"
            for pid in ids:
                receiver.wait_for(pid, lambda got: len(got) >= 1)  # the first attempt failed
            g.kill()
        finally:
            receiver.status_all = None
        before = {pid: len(receiver.for_payment(pid)) for pid in ids}
        assert all(delivered_types(receiver.for_payment(pid)) == [] for pid in ids)
        g.start()
        for pid in ids:
            got = receiver.wait_for(pid, lambda got: len(delivered_types(got)) == 2)
            assert delivered_types(got) == ["payment.authorized", "payment.captured"]
            assert_signed(got, ep["secret"])
            assert len(got) > before[pid]
            for r in got:
                assert event(g, key, r.event["id"])["deliveries"][0]["status"] in ("delivered", "pending")
    finally:
        g.stop()
