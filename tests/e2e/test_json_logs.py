"""`[log] format = "json"`: one JSON object per log line with the request id of the request it belongs to,
the same id sent back as the `Request-Id` header; card numbers and keys never reach the log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from support import Gateway, auth

PAN = "4242424242424242"
LEAKED_KEY = "sk_test_abcdefghijklmnopqrstuv"


def _json_lines(g: Gateway) -> list[dict]:
    return [json.loads(line) for line in g.log().splitlines() if line.startswith("{")]


def test_json_logs_carry_the_request_id_echoed_in_the_header_and_mask_secrets(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", config_text='[log]\nformat = "json"\n').start()
    try:
        with httpx.Client(base_url=g.url, timeout=10) as c:
            ok = c.post("/v1/payments", headers=auth(), json={"amount": 100, "currency": "USD",
                                                             "payment_method": "tok_visa"})
            assert ok.status_code == 201
            assert ok.headers["request-id"].startswith("req_")
            bad_key = c.post("/v1/payments", headers=auth(LEAKED_KEY), json={"amount": 1})
            assert bad_key.status_code == 401
            rid = bad_key.headers["request-id"]
            mine = c.get("/v1/payments/pay_nope", headers={**auth(), "Request-Id": "trace-123"})
            assert mine.headers["request-id"] == "trace-123"
            pan_id = c.get("/healthz", headers={"Request-Id": PAN})
            assert pan_id.headers["request-id"] != PAN  # never echo (or log) a card number
            card = c.post("/v1/payments", headers=auth(), content=json.dumps(
                {"amount": 100, "currency": "USD", "payment_method": "tok_visa", "description": PAN}))
            assert card.status_code == 400
        deadline = time.monotonic() + 10
        while not any(line.get("request_id") == "trace-123" for line in _json_lines(g)):
            assert time.monotonic() < deadline, g.log()[-2000:]
            time.sleep(0.1)
        lines = _json_lines(g)
        assert lines, "no JSON log line"
        for line in lines:
            assert {"time", "level", "logger", "message"} <= line.keys()
        assert any(line.get("request_id") == rid and "401" in line["message"] for line in lines)
        assert ok.headers["request-id"] not in {line.get("request_id") for line in lines}  # 2xx: no access line
    finally:
        g.stop()
    text = g.log()
    assert PAN not in text
    assert LEAKED_KEY not in text
