"""Stripe's wire conventions: form bodies with bracket notation, JSON bodies, API keys, errors.

Stripe's SDKs send `application/x-www-form-urlencoded` bodies whose nested parameters use bracket
notation (`metadata[order_id]=42`, `expand[0]=latest_charge`, `expand[]=latest_charge`); some
clients send JSON. Both decode here into one plain dict of strings, lists and dicts (JSON scalars are
turned into the strings a form would carry), so that each handler validates one shape. Limits, each
with a 400 naming them: `FORM_PARAMS_MAX` parameters, `FORM_DEPTH_MAX` brackets, `LIST_ITEMS_MAX`
items per list, keys of at most `PARAM_NAME_CHARS_MAX` characters. A card number anywhere in a body
(raw or percent-decoded) is `400 card_number_not_allowed`, as on the native API.

The API key is a Bearer token or the user of HTTP Basic (`curl -u sk_test_...:`). The request's
`Stripe-Version` (any dated version) is accepted and recorded: echoed in the answer and counted per
version in `gateway_stripe_requests_total` (at most `VERSIONS_TRACKED_MAX` distinct versions; others
count as `other`). Errors are Stripe's error object `{"error": {type, code, message, param, ...}}`.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from gateway._fastpath import mask_pans
from gateway.api import guard
from gateway.api.http import JSON, Api, Response, read_body
from gateway.domain.errors import error_body
from gateway.store.base import Merchant

FORM_PARAMS_MAX = 256
FORM_DEPTH_MAX = 5
LIST_ITEMS_MAX = 100
PARAM_NAME_CHARS_MAX = 200
BODY_BYTES_MAX = 16 * 1024
VERSIONS_TRACKED_MAX = 32
STRIPE_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]{1,32})?$")
_NAME = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")

Params = dict[str, Any]


class ParamError(Exception):
    """A parameter Stripe would refuse: `400 invalid_request_error` with its `code` and `param`."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def stripe_error(status: int, kind: str, code: str | None, message: str, param: str | None = None,
                 **extra: Any) -> Response:
    """Stripe's error object; `extra` adds fields such as `decline_code` or `payment_intent`. The message
    and param are masked like every error of the gateway (a card-number-like run never leaves)."""
    err: dict[str, Any] = {"type": kind, "message": mask_pans(message)}
    if code is not None:
        err["code"] = code
    if param is not None:
        err["param"] = mask_pans(param)
    err.update((k, v) for k, v in extra.items() if v is not None)
    return status, [JSON], msgspec.json.encode({"error": err})


def invalid(message: str, param: str | None = None, code: str | None = "parameter_invalid") -> Response:
    return stripe_error(400, "invalid_request_error", code, message, param)


def missing(kind: str, ident: str) -> Response:
    return stripe_error(404, "invalid_request_error", "resource_missing", f"No such {kind}: '{ident[:64]}'", "id")


def from_param_error(e: ParamError) -> Response:
    return invalid(e.message, e.param, e.code)


# -- bodies ----------------------------------------------------------------------------------------


def _insert(out: Params, name: str, value: str) -> None:
    m = _NAME.match(name)
    if m is None or len(name) > PARAM_NAME_CHARS_MAX:
        raise ParamError("parameter_invalid", f"Invalid parameter name: {name[:64]}", name[:64])
    parts = [m.group(1), *_BRACKET.findall(m.group(2))]
    if len(parts) > FORM_DEPTH_MAX + 1:
        raise ParamError("parameter_invalid", f"{name[:64]} is nested more than {FORM_DEPTH_MAX} levels deep.",
                         name[:64])
    node: Any = out
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt: Any = value if last else ([] if parts[i + 1] == "" else {})
        if isinstance(node, list):
            if part != "":
                raise ParamError("parameter_invalid", f"Invalid array parameter: {name[:64]}", parts[0])
            if len(node) >= LIST_ITEMS_MAX:
                raise ParamError("parameter_invalid", f"{parts[0]} has more than {LIST_ITEMS_MAX} items.", parts[0])
            node.append(nxt)
            node = nxt
            continue
        if part == "":
            raise ParamError("parameter_invalid", f"Invalid parameter name: {name[:64]}", name[:64])
        if last:
            if part in node:
                raise ParamError("parameter_duplicate", f"Received the parameter {name[:64]} more than once.",
                                 name[:64])
            node[part] = value
        else:
            cur = node.setdefault(part, nxt)
            if type(cur) is not type(nxt):
                raise ParamError("parameter_invalid", f"Conflicting values for {name[:64]}.", name[:64])
            node = cur


def _lists(node: Any) -> Any:
    """Indexed keys (`expand[0]`, `expand[1]`) become a list, in index order."""
    if isinstance(node, dict):
        node = {k: _lists(v) for k, v in node.items()}
        if node and all(k.isascii() and k.isdigit() and len(k) <= 3 for k in node):
            if len(node) > LIST_ITEMS_MAX:
                raise ParamError("parameter_invalid", f"A list has more than {LIST_ITEMS_MAX} items.")
            return [node[k] for k in sorted(node, key=int)]
        return node
    if isinstance(node, list):
        return [_lists(v) for v in node]
    return node


def parse_form(text: str) -> Params:
    out: Params = {}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=FORM_PARAMS_MAX)
    except ValueError:
        raise ParamError("parameter_invalid", f"At most {FORM_PARAMS_MAX} parameters are accepted.") from None
    for name, value in pairs:
        _insert(out, name, value)
    return {k: _lists(v) for k, v in out.items()}


def _stringify(value: Any, depth: int = 0) -> Any:
    if depth > FORM_DEPTH_MAX:
        raise ParamError("parameter_invalid", f"The body is nested more than {FORM_DEPTH_MAX} levels deep.")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return ""
    if isinstance(value, dict):
        return {str(k): _stringify(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > LIST_ITEMS_MAX:
            raise ParamError("parameter_invalid", f"A list has more than {LIST_ITEMS_MAX} items.")
        return [_stringify(v, depth + 1) for v in value]
    return value


def is_json(scope: Any) -> bool:
    return (scope.headers.get("content-type") or "").split(";")[0].strip().lower() == "application/json"


async def read_params(scope: Any, proto: Any) -> Params | Response:
    """The request's parameters: the query string of a GET or DELETE, the body (form or JSON) of a POST."""
    if scope.method in ("GET", "DELETE", "HEAD"):
        try:
            return parse_form(scope.query_string or "")
        except ParamError as e:
            return from_param_error(e)
    raw = await read_body(scope, proto, BODY_BYTES_MAX)
    if not isinstance(raw, bytes):
        return raw
    try:
        if is_json(scope):
            refused = guard.json_body_refusal(raw)
            if refused is not None:
                return refused
            decoded = msgspec.json.decode(raw) if raw.strip() else {}
            if not isinstance(decoded, dict):
                return invalid("The request body must be a JSON object.", code="invalid_json")
            return dict(_stringify(decoded))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return invalid("The request body is not UTF-8.", code="body_invalid")
        if guard.has_card_number(text):
            return guard.card_number_refused()
        return parse_form(text)
    except ParamError as e:
        return from_param_error(e)
    except msgspec.DecodeError:
        return invalid("The request body is not valid JSON.", code="invalid_json")


# -- API keys and versions ----------------------------------------------------------------------------


def api_key(scope: Any) -> str | None:
    header = scope.headers.get("authorization") or ""
    if header.startswith("Bearer "):
        return header[7:].strip() or None
    if header.startswith("Basic "):
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.split(":", 1)[0] or None
    return None


def authenticate(app: Api, scope: Any) -> Merchant | Response:
    auth = app.authenticate_key(api_key(scope))
    if isinstance(auth, Merchant):
        return auth
    status, _headers, body = auth
    code = msgspec.json.decode(body)["error"]["code"]
    message = ("You did not provide an API key. Provide it as 'Authorization: Bearer sk_...' or as the user"
               " of HTTP Basic authentication." if code == "missing_api_key" else "Invalid API Key provided.")
    return status, [JSON, ("www-authenticate", 'Basic realm="Stripe"')], error_body(
        status, code, message, kind="authentication_error")


class Versions:
    """Counts of the `Stripe-Version` values seen (bounded), for `/metrics`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def record(self, scope: Any) -> tuple[str, str] | None:
        """Counts the request's version; the header that echoes it, or None without one."""
        version = scope.headers.get("stripe-version")
        if not version:
            label = "none"
        elif STRIPE_VERSION.match(version) and (version in self.counts or len(self.counts) < VERSIONS_TRACKED_MAX):
            label = version
        else:
            label = "other"
        with self._lock:
            self.counts[label] = self.counts.get(label, 0) + 1
        return ("stripe-version", version) if version and STRIPE_VERSION.match(version) else None

    def render(self) -> str:
        lines = ["# HELP gateway_stripe_requests_total Requests of the Stripe-compatible surface by Stripe-Version.",
                 "# TYPE gateway_stripe_requests_total counter"]
        with self._lock:
            lines += [f'gateway_stripe_requests_total{{version="{v}"}} {n}' for v, n in sorted(self.counts.items())]
        return "\n".join(lines) + "\n"


VERSIONS = Versions()


def stripe_request(scope: Any) -> bool:
    """A request on a path both surfaces serve (`/v1/webhook_endpoints`, `/v1/events`) is Stripe's when it
    says so: a `Stripe-Version` header, a form body, or HTTP Basic authentication (the native API takes
    JSON bodies and Bearer keys only)."""
    headers = scope.headers
    if headers.get("stripe-version"):
        return True
    if (headers.get("content-type") or "").startswith("application/x-www-form-urlencoded"):
        return True
    return (headers.get("authorization") or "").startswith("Basic ")


# -- parameter values ----------------------------------------------------------------------------------


def take_str(params: Params, name: str, max_chars: int = 5000, required: bool = False) -> str | None:
    value = params.pop(name, None)
    if value is None or value == "":
        if required:
            raise ParamError("parameter_missing", f"Missing required param: {name}.", name)
        return None
    if not isinstance(value, str):
        raise ParamError("parameter_invalid_string", f"Invalid string: {name} must be a string.", name)
    if len(value) > max_chars:
        raise ParamError("parameter_invalid_string_too_long",
                         f"Invalid string: {name} must be at most {max_chars} characters.", name)
    if not value.isprintable() and any(c not in "\n\t" and not c.isprintable() for c in value):
        raise ParamError("parameter_invalid_string", f"Invalid string: {name} has control characters.", name)
    return value


def take_int(params: Params, name: str, lo: int, hi: int, required: bool = False) -> int | None:
    value = params.pop(name, None)
    if value is None or value == "":
        if required:
            raise ParamError("parameter_missing", f"Missing required param: {name}.", name)
        return None
    parsed = guard.strict_int(value, lo, hi) if isinstance(value, str) else None
    if parsed is None:
        raise ParamError("parameter_invalid_integer", f"Invalid integer: {name} must be an integer in {lo}..{hi}.",
                         name)
    return parsed


def take_bool(params: Params, name: str) -> bool | None:
    value = params.pop(name, None)
    if value is None or value == "":
        return None
    if value not in ("true", "false"):
        raise ParamError("parameter_invalid_boolean", f"Invalid boolean: {name} must be true or false.", name)
    return value == "true"


def take_choice(params: Params, name: str, choices: tuple[str, ...]) -> str | None:
    value = take_str(params, name, 64)
    if value is not None and value not in choices:
        raise ParamError("parameter_invalid", f"Invalid {name}: must be one of {', '.join(choices)}.", name)
    return value


def take_list(params: Params, name: str) -> list[str]:
    value = params.pop(name, None)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ParamError("parameter_invalid", f"Invalid array: {name} must be a list of strings.", name)
    return value


def take_metadata(params: Params) -> dict[str, str] | None:
    value = params.pop("metadata", None)
    if value is None:
        return None
    if value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ParamError("parameter_invalid", "Invalid metadata: must be a hash of strings.", "metadata")
    return value


def take_expand(params: Params) -> set[str]:
    return set(take_list(params, "expand"))


def no_more(params: Params) -> None:
    """The parameters left over are unknown to this call: refused, naming the first."""
    if params:
        name = next(iter(params))[:64]
        raise ParamError("parameter_unknown", f"Received unknown parameter: {name}", name)
