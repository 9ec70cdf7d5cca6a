"""Logging set-up with a filter that masks card numbers and API keys: the second line of defence
behind the fast path, which refuses card numbers before anything is written.

`[log] format = "json"` writes one JSON object per line (`time`, `level`, `logger`, `message`,
`request_id` when the line was logged while serving a request, `exception` with the traceback), every
text field passed through the same masking. The request id is `REQUEST_ID` (a context variable the
API sets per request and sends back as the `Request-Id` header).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time

from gateway._fastpath import contains_pan

_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d){11,18}")
# Merchant API keys (sk_test_, sk_live_), the risk admin key (ak_) and webhook signing secrets (whsec_).
_API_KEY = re.compile(r"\b(sk_(?:test|live)_|ak_|whsec_)[A-Za-z0-9_\-]{4,}")


def redact(text: str) -> str:
    if any(ch.isdigit() for ch in text):
        text = _DIGIT_RUN.sub(lambda m: "[REDACTED PAN]" if contains_pan(m.group(0)) else m.group(0), text)
    if "sk_" in text or "ak_" in text or "whsec_" in text:
        text = _API_KEY.sub(r"\1***", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg = clean
            record.args = None
        return True


# The id of the request being served (None outside a request); set by the API in JSON-log mode.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id(client_value: str | None) -> str:
    """The client's `Request-Id` when it is a short token (and not a card number), else a new one."""
    if client_value and _CLIENT_REQUEST_ID.match(client_value) and not contains_pan(client_value):
        return client_value
    return "req_" + secrets.token_hex(8)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the message and any traceback masked like every other log line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        rid = REQUEST_ID.get()
        if rid is not None:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
