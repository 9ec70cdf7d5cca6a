"""The API's one guard on hostile input: card numbers, strict numbers, idempotency keys, bodies.

Everything that enters or leaves through the HTTP API passes through these functions, and every one
of them uses the Rust detector (`gateway._fastpath`: `contains_pan`, `mask_pans`, `json_refusal`), so
that "looks like a card number" means one thing on the fast path and everywhere else:

- the path and the query string of every `/v1/` request, raw and percent-decoded (`check_request`,
  called once by the app before routing), and the `Idempotency-Key` header: at most
  `IDEMPOTENCY_KEY_CHARS_MAX` printable ASCII characters, never a card number; a key that is present
  but unreadable (UTF-8 or Latin-1 bytes) is refused, never ignored;
- JSON bodies (`json_body_refusal`): every key and string after its escapes are decoded, every value
  of a key given twice (a duplicated key is refused), numbers on merchant endpoints;
- free text that is stored or echoed (URLs after percent-decoding, list values, audit text):
  `has_card_number`;
- every error message and `param` the Python side answers: `errors.error_body` masks any
  card-number-like run, as a last line of defence.

A refusal is `400 card_number_not_allowed`, which never says where the number was.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

from gateway._fastpath import contains_pan, json_refusal, key_contains_pan
from gateway.api.http import Response, error, read_body
from gateway.domain.idempotency import IDEMPOTENCY_KEY_CHARS_MAX

IDEMPOTENCY_HEADER = "Idempotency-Key"
CARD_NUMBER_MESSAGE = ("The request contains what looks like a card number. Send a payment method token instead;"
                       " raw card numbers are never accepted.")
# Percent-decoding is applied at most this many times (`%2520` is `%20` once decoded): enough for
# every double-encoding a client library produces, and a bound on the work per request.
PERCENT_DECODE_ROUNDS_MAX = 3
# Digits of a strictly parsed integer (2^63 has 19): a bound on the work before the range check.
INT_DIGITS_MAX = 19


def card_number_refused() -> Response:
    return error(400, "card_number_not_allowed", CARD_NUMBER_MESSAGE)


def has_card_number(text: str) -> bool:
    """True when `text`, or its percent-decoded form (`4242%204242...`), holds a card-number-like run."""
    if contains_pan(text):
        return True
    for _ in range(PERCENT_DECODE_ROUNDS_MAX):
        if "%" not in text and "+" not in text:
            return False
        decoded = unquote_plus(text)
        if decoded == text:
            return False
        if contains_pan(decoded):
            return True
        text = decoded
    return False


def strict_int(raw: str, lo: int, hi: int) -> int | None:
    """`raw` as an integer in lo..hi when it is ASCII digits only (no sign, space, `²` or `٣`), else None."""
    if not raw or len(raw) > INT_DIGITS_MAX or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if lo <= value <= hi else None


def printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


def idempotency_key(scope: Any) -> str | None | Response:
    """The request's `Idempotency-Key` (None when absent), or the 400 that refuses it.

    The server hands header values over as text only when they are visible ASCII; a value with other
    bytes comes back as None although the header is there, so presence is checked by name: such a key
    must be refused, not ignored (ignoring it would turn every retry into a new payment)."""
    headers = scope.headers
    key = headers.get("idempotency-key")
    if key is None:
        if "idempotency-key" not in headers:
            return None
        key = ""
    if len(headers.get_all("idempotency-key")) > 1:
        # Two keys: which one the merchant meant cannot be known, and each side could pick another.
        return error(400, "idempotency_key_invalid", f"{IDEMPOTENCY_HEADER} must be given once.",
                     IDEMPOTENCY_HEADER)
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_CHARS_MAX or not printable_ascii(key):
        return error(400, "idempotency_key_invalid",
                     f"{IDEMPOTENCY_HEADER} must be 1 to {IDEMPOTENCY_KEY_CHARS_MAX} printable ASCII characters.",
                     IDEMPOTENCY_HEADER)
    # (UUIDs and long hex tokens are opaque here: their digits make a Luhn-valid run one time in 300.)
    if key_contains_pan(key):
        return card_number_refused()
    return key


def check_request(path: str, query: str) -> Response | None:
    """The 400 for a card number in the path (as the server decoded it) or the query string, or for a
    path with control characters (`%00`), which no route names; None when the request may be routed."""
    if has_card_number(path) or (query and has_card_number(query)):
        return card_number_refused()
    if not path.isprintable():
        return error(400, "path_invalid", "The request path contains control characters.")
    return None


async def read_json_body(scope: Any, proto: Any, limit: int, numbers: bool = True,
                         invalid_code: str = "invalid_json") -> bytes | Response:
    """The request's JSON body, read within `limit` bytes (`read_body`) and let through by
    `json_body_refusal` (with its `numbers` and `invalid_code`), or the answer that refuses it."""
    raw = await read_body(scope, proto, limit)
    if not isinstance(raw, bytes):
        return raw
    refused = json_body_refusal(raw, numbers, invalid_code)
    return raw if refused is None else refused


def json_body_refusal(raw: bytes, numbers: bool = True, invalid_code: str = "invalid_json") -> Response | None:
    """The 400 that refuses a JSON body for a card number (keys, strings, and numbers when `numbers`),
    a duplicated key, deep nesting, or for not being JSON at all (`invalid_code`; its raw text is
    scanned first, so that the answer cannot be told apart from a card number's by a probe); None
    when the body may be decoded. An empty body is left to the caller (most treat it as `{}`)."""
    refusal = json_refusal(raw, numbers)
    if refusal is None:
        return None
    why, detail = refusal
    if why == "card_number":
        return card_number_refused()
    if why == "duplicate_key":
        return error(400, "parameter_duplicate", f"Received the parameter {detail} more than once.", detail)
    if why == "too_deep":
        return error(400, "invalid_json", "The request body is nested too deeply.")
    if not raw.strip():
        return None
    if contains_pan(raw.decode("utf-8", errors="replace")):
        return card_number_refused()
    # Refused here rather than left to the handler's decoder: a body the scan could not read is never
    # decoded by a more lenient parser, so nothing in it escapes the scan.
    return error(400, invalid_code, f"The request body is not valid JSON ({detail}).")
