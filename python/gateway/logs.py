"""Logging set-up with a filter that masks card numbers and API keys: the second line of defence
behind the fast path, which refuses card numbers before anything is written."""

from __future__ import annotations

import logging
import re

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


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
