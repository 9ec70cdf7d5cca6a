"""The API's guard (gateway.api.guard), the Rust detector it exposes, the masking of error objects and
the rate limit on tracebacks, without a server."""

from __future__ import annotations

import json

import pytest
from gateway._fastpath import json_refusal, mask_pans
from gateway.api import guard
from gateway.api.app import TracebackLimiter
from gateway.domain.errors import error_body

PAN = "4242424242424242"


class _Headers:
    def __init__(self, values: dict[str, str | None]) -> None:
        self._values = values

    def get(self, key: str, default: object = None) -> object:
        value = self._values.get(key)
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def get_all(self, key: str) -> list[str]:
        value = self._values.get(key)
        if isinstance(value, list):
            return value
        return [] if value is None else [value]


class _Scope:
    def __init__(self, headers: dict[str, str | None]) -> None:
        self.headers = _Headers(headers)


@pytest.mark.parametrize(("raw", "expected"), [
    ("5", 5), ("100", 100), ("0", None), ("101", None), ("²", None), ("٣", None), ("５", None), ("-1", None),
    ("+1", None), (" 1", None), ("1e2", None), ("", None), ("9" * 40, None),
])
def test_strict_int_takes_ascii_digits_in_range_only(raw: str, expected: int | None) -> None:
    assert guard.strict_int(raw, 1, 100) == expected


@pytest.mark.parametrize("text", [
    PAN, "4242 4242 4242 4242", "4242-4242-4242-4242", "4242%204242%204242%204242", "4242+4242+4242+4242",
    "4242%25204242%25204242%25204242", "pay_4242424242424242",
])
def test_card_numbers_are_found_in_every_written_form(text: str) -> None:
    assert guard.has_card_number(text)


def test_order_numbers_and_long_runs_are_not_card_numbers() -> None:
    assert not guard.has_card_number("order 4242424242424241")
    assert not guard.has_card_number("42424242424242424242424242")
    assert not guard.has_card_number("%ZZ%")


@pytest.mark.parametrize(("headers", "param"), [
    ({"idempotency-key": None}, "Idempotency-Key"),  # present, but not visible ASCII: the server hides it
    ({"idempotency-key": ""}, "Idempotency-Key"),
    ({"idempotency-key": "k" * 256}, "Idempotency-Key"),
    ({"idempotency-key": "a\u00e9"}, "Idempotency-Key"),
])
def test_unusable_idempotency_keys_are_refused(headers: dict[str, str | None], param: str) -> None:
    answer = guard.idempotency_key(_Scope(headers))
    assert isinstance(answer, tuple) and answer[0] == 400
    assert json.loads(answer[2])["error"]["param"] == param


def test_idempotency_key_given_twice_is_refused() -> None:
    class Twice(_Headers):
        def get_all(self, key: str) -> list[str]:
            return ["a", "b"] if key == "idempotency-key" else []

    scope = _Scope({"idempotency-key": "a"})
    scope.headers = Twice({"idempotency-key": "a"})
    answer = guard.idempotency_key(scope)
    assert isinstance(answer, tuple) and answer[0] == 400


def test_idempotency_key_with_card_number_is_refused_without_echo() -> None:
    answer = guard.idempotency_key(_Scope({"idempotency-key": f"k-{PAN}"}))
    assert isinstance(answer, tuple) and answer[0] == 400
    assert json.loads(answer[2])["error"]["code"] == "card_number_not_allowed" and PAN not in answer[2].decode()


def test_absent_and_good_idempotency_keys_pass() -> None:
    assert guard.idempotency_key(_Scope({})) is None
    assert guard.idempotency_key(_Scope({"idempotency-key": "order-1001"})) == "order-1001"


def test_json_scan_refuses_duplicates_escapes_and_depth() -> None:
    assert json_refusal(b'{"a":1,"b":[1,2]}') is None
    assert json_refusal(b'{"a":1,"a":2}') == ("duplicate_key", "a")
    assert json_refusal(b'{"a":4242424242424242,"a":2}') == ("card_number", None)
    assert json_refusal(b'{"a":"\\u0034242424242424242"}') == ("card_number", None)
    assert json_refusal(b'{"since_ms":4242424242424242}', numbers=False) is None
    assert json_refusal(b"[" * 50 + b"]" * 50) == ("too_deep", None)
    assert json_refusal(b'{"a":')[0] == "invalid"


def test_error_objects_never_repeat_a_card_number() -> None:
    body = json.loads(error_body(404, "resource_missing", f"No such payment: 'pay_{PAN}'", f"x{PAN}"))
    assert PAN not in json.dumps(body)
    assert body["error"]["message"] == "No such payment: 'pay_[REDACTED]'"
    assert mask_pans("no digits here") == "no digits here"


def _raise_at_one_place() -> None:
    raise ValueError("boom")


def test_tracebacks_are_logged_once_per_cause_per_interval() -> None:
    limiter = TracebackLimiter(interval_s=60.0)
    errors = []
    for _ in range(5):
        try:
            _raise_at_one_place()
        except ValueError as e:
            errors.append(e)
    assert limiter.admit(errors[0], now=0.0) == 0
    assert [limiter.admit(e, now=1.0) for e in errors[1:]] == [None] * 4
    assert limiter.admit(errors[0], now=61.0) == 4  # the next report counts the ones not logged
    try:
        raise KeyError("other")
    except KeyError as other:
        assert limiter.admit(other, now=61.5) == 0  # another cause is reported at once


# -- the app's guard before the cluster runtime ----------------------------------------------------


class _Proto:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.answer: tuple[int, list[tuple[str, str]], bytes] | None = None

    async def __call__(self) -> bytes:
        return self.body

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.answer = (status, headers, body)


class _RsgiHeaders(_Headers):
    def keys(self) -> list[str]:
        return list(self._values)

    def values(self) -> list[str]:
        return [v or "" for v in self._values.values()]


class _RsgiScope:
    def __init__(self, path: str, headers: dict[str, str | None], query: str = "") -> None:
        self.path = path
        self.method = "POST"
        self.query_string = query
        self.headers = _RsgiHeaders(headers)


@pytest.mark.parametrize("key", [None, f"k-{PAN}", "k" * 256, ""])
def test_cluster_mode_refuses_bad_keys_before_the_shared_state(key: str | None) -> None:
    """A key the server hides (non-ASCII bytes: None with the header present), a card number, or one
    over 255 characters never reaches Redis or the fast path in cluster mode."""
    import asyncio

    from gateway.api.app import GatewayApp
    from gateway.domain.secrets import hash_api_key
    from test_cluster_api import BODY, MERCHANT, make

    cluster, stub, shared = make()
    app = GatewayApp(cluster)
    app._merchants[hash_api_key("sk_test_x")] = MERCHANT
    proto = _Proto(BODY)
    scope = _RsgiScope("/v1/payments", {"authorization": "Bearer sk_test_x", "idempotency-key": key})
    asyncio.run(app.__rsgi__(scope, proto))
    assert proto.answer is not None and proto.answer[0] == 400
    assert PAN not in proto.answer[2].decode()
    assert stub.accepted == [] and shared.values == {}


def test_uuid_keys_are_never_read_as_card_numbers() -> None:
    """One UUID in 300 has digit groups that form a Luhn-valid run; such keys are accepted (a UUID is
    an opaque identifier), while a card number anywhere else in a key is refused."""
    import random
    import uuid

    from gateway._fastpath import contains_pan

    rng = random.Random(16)
    keys = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(20_000)]
    runs = [k for k in keys if contains_pan(str(k)) or contains_pan(k.hex)]
    assert len(runs) > 20  # the detector alone would refuse these
    for k in runs:
        for form in (str(k), k.hex, str(k).upper(), f"order-{k}"):
            assert guard.idempotency_key(_Scope({"idempotency-key": form})) == form
    refused = guard.idempotency_key(_Scope({"idempotency-key": f"{PAN}:{keys[0]}"}))
    assert isinstance(refused, tuple) and refused[0] == 400


def test_event_ids_never_hold_what_the_card_number_guard_refuses() -> None:
    """Event ids are path segments of GET /v1/events/{id}: none may look like a card number, whatever
    the payment id and the counter (the counter's six digits once ran on into a hex tail)."""
    from gateway._fastpath import contains_pan
    from gateway.domain.events import event_id

    # A hex tail after the counter gave about 0.7% of ids a Luhn-valid run of 13..19 digits.
    for n in (1, 2, 99, 123456, 999999):
        for _ in range(4000):
            eid = event_id("pay_abcdefghjkmnpqrs01234567", n)
            assert not contains_pan(eid), eid
    # Endpoint and operation ids (24 hex characters once: 0.18% of them held such a run).
    from gateway.domain.events import new_endpoint_id, random_letters

    assert not any(contains_pan(new_endpoint_id()) or contains_pan(random_letters(24)) for _ in range(20000))
