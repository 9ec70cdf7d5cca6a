"""Each hostile input the fuzz run of issue 16 found, as a regression test against a real gateway:
unreadable bodies, non-ASCII digits in numbers, admin values that overflowed SQL, idempotency keys
that were ignored, card numbers echoed, accepted or written to disk, and granian's own answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fuzzing import build, files_with_pans, luhn_complete, send
from support import Gateway, auth

ADMIN_KEY = "ak_test_" + "h" * 24
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"amount": 1000, "currency": "USD", "payment_method": "tok_visa"}
PAN = "4242424242424242"
PAN_19 = luhn_complete("922337203685477580")  # 19 digits, as in the fuzz run's duplicated amount
AUTH_RAW = (b"Authorization", b"Bearer sk_test_demo")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("hostile") / "data", extra_env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    yield g
    g.stop()


def error_of(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"} and {"type", "code", "message", "param"} <= set(body["error"]), r.text
    return dict(body["error"])


def payment_count(g: Gateway) -> int:
    r = httpx.get(f"{g.url}/v1/payments?limit=100", headers=auth(), timeout=10)
    assert r.status_code == 200
    return len(r.json()["data"])


def new_payment(g: Gateway) -> str:
    r = httpx.post(f"{g.url}/v1/payments", json=BODY, headers=auth(), timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# -- every request gets a deliberate answer --------------------------------------------------------


@pytest.mark.parametrize("tail", [
    "short",  # a Content-Length longer than the body, then the end of the input
    "bad_chunk",  # a chunk size that is not hexadecimal
    "both",  # Transfer-Encoding and Content-Length together
    "trailer",  # a malformed trailer
])
def test_unreadable_body_is_a_400_or_a_closed_connection_never_a_500(gw: Gateway, tail: str) -> None:
    payload = json.dumps(BODY).encode()
    if tail == "short":
        raw = build("POST", "/v1/payments", [AUTH_RAW, (b"Content-Length", b"500")], None) + payload
    elif tail == "bad_chunk":
        raw = build("POST", "/v1/payments", [AUTH_RAW, (b"Transfer-Encoding", b"chunked")], None) + (
            b"zz\r\n" + payload + b"\r\n0\r\n\r\n")
    elif tail == "both":
        raw = build("POST", "/v1/payments", [AUTH_RAW, (b"Transfer-Encoding", b"chunked"),
                                             (b"Content-Length", b"3")], None) + (
            f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n")
    else:
        raw = build("POST", "/v1/payments", [AUTH_RAW, (b"Transfer-Encoding", b"chunked")], None) + (
            f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\nno colon here\r\n\r\n")
    ans = send(gw.port, raw, half_close=tail == "short")
    assert ans.status is None or ans.status < 500, ans.raw
    if tail == "short":
        assert ans.status == 400 and json.loads(ans.body)["error"]["code"] == "body_unreadable"
    assert "unhandled error" not in gw.log()


@pytest.mark.parametrize("path", [
    "/v1/payments?limit=%C2%B2",  # '²': str.isdigit() says yes, int() says no
    "/v1/payments?limit=%D9%A3",  # Arabic-Indic three: int() would take it
    "/v1/payments?limit=%EF%BC%95",  # fullwidth five
    "/v1/payments?limit=99999999999999999999999",
    "/v1/events?payment=pay_aaaaaaaaaaaaaaaaaaaaaaaa&limit=%C2%B2",
    "/v1/admin/rules/history?limit=%C2%B2",
    "/v1/admin/rules/history?before=%D9%A3",
    "/v1/admin/audit?limit=%C2%B2",
    "/v1/admin/lists/hostile?limit=%C2%B2",
])
def test_numbers_in_query_strings_are_ascii_digits_in_range(gw: Gateway, path: str) -> None:
    if "/lists/hostile" in path:
        httpx.post(f"{gw.url}/v1/admin/lists", json={"name": "hostile", "kind": "string"}, headers=ADMIN, timeout=10)
    headers = ADMIN if "/admin/" in path else auth()
    r = httpx.get(f"{gw.url}{path}", headers=headers, timeout=10)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] in ("limit", "before")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/admin/rules/rollback", {"version": 2**63}, "version"),
    ("/v1/admin/rules/rollback", {"version": 2**64 + 1}, "version"),
    ("/v1/admin/rules", {"source": "", "author": "\u0000"}, "author"),
    ("/v1/admin/rules", {"source": "", "author": "a" * 201}, "author"),
    ("/v1/admin/rules", {"source": "", "author": "ok", "comment": "c\u0000"}, "comment"),
    ("/v1/admin/rules", {"source": "", "author": "ok", "comment": "c" * 2001}, "comment"),
    ("/v1/admin/lists", {"name": "huge", "kind": "string", "entries_max": 2**63}, "entries_max"),
    ("/v1/admin/lists", {"name": "huge", "kind": "string", "entries_max": 10**30}, "entries_max"),
    ("/v1/admin/rules/backtest", {"source": "", "after_lsn": 2**64}, "after_lsn"),
])
def test_admin_values_are_bounded_before_sql(gw: Gateway, path: str, body: dict[str, object], param: str) -> None:
    r = httpx.post(f"{gw.url}{path}", json=body, headers=ADMIN, timeout=30)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


def test_admin_author_in_the_query_string_is_bounded_too(gw: Gateway) -> None:
    r = httpx.delete(f"{gw.url}/v1/admin/rules/shadow", params={"author": "\u0000"}, headers=ADMIN, timeout=10)
    assert r.status_code == 400 and error_of(r)["param"] == "author"


# -- idempotency keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ключ-ü-✓".encode(), b"latin-\xfc-key", b"a\x80b"])
def test_non_ascii_idempotency_key_is_refused_never_ignored(gw: Gateway, key: bytes) -> None:
    before = payment_count(gw)
    raw = build("POST", "/v1/payments", [AUTH_RAW, (b"Idempotency-Key", key), (b"Content-Type", b"application/json")],
                json.dumps(BODY).encode())
    for _ in range(3):  # retries must not make payments
        ans = send(gw.port, raw)
        assert ans.status == 400, ans.raw
        assert json.loads(ans.body)["error"]["param"] == "Idempotency-Key"
    assert payment_count(gw) == before


def test_non_ascii_idempotency_key_is_refused_on_operations(gw: Gateway) -> None:
    pid = new_payment(gw)
    raw = build("POST", f"/v1/payments/{pid}/void", [AUTH_RAW, (b"Idempotency-Key", "ключ".encode())], b"{}")
    ans = send(gw.port, raw)
    assert ans.status == 400 and json.loads(ans.body)["error"]["param"] == "Idempotency-Key", ans.raw


def test_too_long_idempotency_key_is_refused(gw: Gateway) -> None:
    r = httpx.post(f"{gw.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": "k" * 256}, timeout=10)
    assert r.status_code == 400 and error_of(r)["param"] == "Idempotency-Key"


# -- card numbers: refused, never echoed -----------------------------------------------------------


def assert_refused_without_echo(r: httpx.Response, *pans: str) -> None:
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "card_number_not_allowed"
    flat = (r.text + "".join(f"{k}:{v}" for k, v in r.headers.items())).replace(" ", "").replace("-", "")
    for pan in pans or (PAN,):
        assert pan not in flat


@pytest.mark.parametrize("path", [
    f"/v1/payments?{PAN}=1",  # an unknown parameter's name was echoed in message and param
    f"/v1/payments?limit=1&starting_after={PAN}",
    f"/v1/payments/pay_{PAN}",  # a 404 said "No such payment: 'pay_<digits>'"
    "/v1/payments/4242%204242%204242%204242",
    "/v1/payments?x=4242%2B4242%2B4242%2B4242",
    f"/v1/events?payment={PAN}",
])
def test_card_number_in_path_or_query_is_refused_and_not_echoed(gw: Gateway, path: str) -> None:
    assert_refused_without_echo(httpx.get(f"{gw.url}{path}", headers=auth(), timeout=10))


def test_idempotency_key_with_card_number_is_refused_and_not_echoed(gw: Gateway) -> None:
    before = payment_count(gw)
    r = httpx.post(f"{gw.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": f"order-{PAN}"},
                   timeout=10)
    assert_refused_without_echo(r)
    assert payment_count(gw) == before


@pytest.mark.parametrize("url", [
    f"https://example.com/hooks/{PAN}",
    "https://example.com/hooks/4242%204242%204242%204242",  # digit groups separated by %20
    "https://example.com/hooks?card=4242%25204242%25204242%25204242",  # and encoded twice
])
def test_webhook_url_with_card_number_is_refused(gw: Gateway, url: str) -> None:
    r = httpx.post(f"{gw.url}/v1/webhook_endpoints", json={"url": url}, headers=auth(), timeout=10)
    assert_refused_without_echo(r)


@pytest.mark.parametrize("body", [
    '{"amount":' + PAN_19 + ',"amount":2,"currency":"USD","payment_method":"tok_visa"}',
    '{"amount":1000,"currency":"USD","payment_method":"tok_visa","description":"' + PAN + '","description":"x"}',
    '{"amount":1000,"currency":"USD","payment_method":"tok_visa","description":"\\u0034242424242424242"}',
])
def test_card_number_in_duplicated_key_or_escape_is_refused(gw: Gateway, body: str) -> None:
    r = httpx.post(f"{gw.url}/v1/payments", content=body, headers={**auth(), "content-type": "application/json"},
                   timeout=10)
    assert_refused_without_echo(r, PAN_19, PAN)


def test_duplicated_key_is_refused_on_create_and_operations(gw: Gateway) -> None:
    r = httpx.post(f"{gw.url}/v1/payments", content=b'{"amount":1000,"amount":2,"currency":"USD",'
                   b'"payment_method":"tok_visa"}', headers=auth(), timeout=10)
    assert r.status_code == 400 and error_of(r)["code"] == "parameter_duplicate" and error_of(r)["param"] == "amount"
    pid = new_payment(gw)
    r = httpx.post(f"{gw.url}/v1/payments/{pid}/refunds", content=b'{"reason":"%s","reason":"ok"}' % PAN.encode(),
                   headers=auth(), timeout=10)
    assert_refused_without_echo(r)


def test_card_numbers_in_admin_values_are_refused(gw: Gateway) -> None:
    httpx.post(f"{gw.url}/v1/admin/lists", json={"name": "cards", "kind": "string"}, headers=ADMIN, timeout=10)
    for path, body in [("/v1/admin/lists/cards/add", {"values": [PAN]}),
                       ("/v1/admin/lists/cards/add", {"values": ["ok"], "author": f"ana {PAN}"}),
                       ("/v1/admin/rules", {"source": "", "author": "ana", "comment": f"card {PAN}"})]:
        assert_refused_without_echo(httpx.post(f"{gw.url}{path}", json=body, headers=ADMIN, timeout=10))
    r = httpx.delete(f"{gw.url}/v1/admin/rules/shadow", params={"comment": PAN}, headers=ADMIN, timeout=10)
    assert_refused_without_echo(r)


# -- the HTTP edge ---------------------------------------------------------------------------------


def test_too_many_headers_get_the_error_object(gw: Gateway) -> None:
    headers = {**auth(), **{f"x-h{i}": "v" for i in range(70)}}
    r = httpx.get(f"{gw.url}/v1/payments", headers=headers, timeout=10)
    assert r.status_code == 431 and error_of(r)["code"] == "headers_too_large"


def test_websocket_upgrade_gets_an_api_answer(gw: Gateway) -> None:
    raw = build("GET", "/v1/payments?limit=1", [AUTH_RAW, (b"Upgrade", b"websocket")], None)
    ans = send(gw.port, raw)
    assert ans.status == 200 and json.loads(ans.body)["object"] == "list", ans.raw


# -- nothing of the above on disk ------------------------------------------------------------------


def test_refused_card_numbers_are_written_nowhere(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", extra_env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    try:
        with httpx.Client(base_url=g.url, timeout=10) as c:
            c.post("/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": f"k-{PAN}"})
            c.post("/v1/admin/lists", json={"name": "vals", "kind": "string"}, headers=ADMIN)
            c.post("/v1/admin/lists/vals/add", json={"values": [PAN, "fine"]}, headers=ADMIN)
            c.post("/v1/admin/rules", json={"source": "", "author": PAN, "comment": PAN}, headers=ADMIN)
            c.post("/v1/webhook_endpoints", json={"url": "https://example.com/4242%204242%204242%204242"},
                   headers=auth())
            ok = c.post("/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": "fine-key"})
            assert ok.status_code == 201
    finally:
        g.stop()
    assert files_with_pans(g.data_dir, [PAN]) == {}
    assert PAN not in g.log().replace(" ", "")


def test_nul_in_stored_merchant_text_is_refused(gw: Gateway) -> None:
    """PostgreSQL refuses a NUL in text (a 500 in cluster mode): refused as a bad parameter in both."""
    pid = new_payment(gw)
    r = httpx.post(f"{gw.url}/v1/payments/{pid}/void", json={"reason": "a\u0000b"}, headers=auth(), timeout=10)
    assert r.status_code == 400 and error_of(r)["param"] == "reason"
    r = httpx.post(f"{gw.url}/v1/webhook_endpoints", json={"url": "https://example.com/h", "description": "\u0000"},
                   headers=auth(), timeout=10)
    assert r.status_code == 400 and error_of(r)["param"] == "description"


def test_two_idempotency_keys_are_refused(gw: Gateway) -> None:
    before = payment_count(gw)
    raw = build("POST", "/v1/payments", [AUTH_RAW, (b"Idempotency-Key", b"first"), (b"Idempotency-Key", b"second")],
                json.dumps(BODY).encode())
    ans = send(gw.port, raw)
    assert ans.status == 400 and json.loads(ans.body)["error"]["param"] == "Idempotency-Key", ans.raw
    assert payment_count(gw) == before
