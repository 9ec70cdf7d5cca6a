"""A seeded generator of hostile HTTP requests and the checks every answer must pass.

Request `i` of a run with seed `s` is built from `random.Random(f"{s}:{i}")` alone (plus the ids of
payments created before it), so a failure is replayed with the same `FUZZ_SEED` and `FUZZ_REQUESTS`.
Requests go over raw sockets (one connection each, `Connection: close`) so that framing can be
broken on purpose: a Content-Length longer than the body, bad chunk sizes, both Transfer-Encoding and
Content-Length, 100+ headers, `Upgrade: websocket`.

Every card number the generator puts anywhere (JSON values, keys, escapes, duplicated keys, query
strings, paths, headers, webhook URLs, list values, audit text) is remembered, so the test can assert
that no answer repeats it and that no file under the data dir holds it afterwards.
"""

from __future__ import annotations

import json
import random
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

REQUEST_TIMEOUT_S = 10.0
RESPONSE_BYTES_MAX = 4 * 1024 * 1024
ERROR_FIELDS = {"type", "code", "message", "param"}
ERROR_EXTRA_FIELDS = {"decline_code", "payment_id", "errors"}
# Request families whose framing is broken on purpose: the server may close the connection instead
# of answering (never with a 5xx).
FRAMING = "framing"
# What granian answers itself, with an empty body, to a request head it cannot parse (400: broken
# framing, a control character in a header value) or to more than 100 header fields (431).
GRANIAN_STATUSES = (400, 431)


def luhn_complete(prefix: str) -> str:
    """`prefix` plus the check digit that makes it Luhn-valid."""
    total = 0
    for i, ch in enumerate(reversed(prefix + "0")):
        d = int(ch)
        if i % 2:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return prefix + str((10 - total % 10) % 10)


def new_pan(rng: random.Random) -> str:
    length = rng.choice((13, 15, 16, 16, 16, 19))
    first = rng.choice("3456")
    return luhn_complete(first + "".join(rng.choice("0123456789") for _ in range(length - 2)))


def _groups(pan: str, sep: str) -> str:
    return sep.join(pan[i:i + 4] for i in range(0, len(pan), 4))


def pan_form(rng: random.Random, pan: str) -> str:
    """A way of writing `pan` that a merchant (or an attacker) might use, as plain text."""
    return rng.choice((pan, _groups(pan, " "), _groups(pan, "-"), pan))


@dataclass
class Request:
    family: str
    raw: bytes
    method: str
    path: str
    pans: list[str] = field(default_factory=list)
    # Close the sending side once sent (a body cut short: the server must see the end of the input).
    half_close: bool = False


@dataclass
class Answer:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: bytes
    raw: bytes


def send(port: int, raw: bytes, half_close: bool = False) -> Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as s:
        try:
            s.sendall(raw)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early on a refused head; what it answered is read below
        chunks: list[bytes] = []
        total = 0
        try:
            while total < RESPONSE_BYTES_MAX:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
                total += len(c)
        except (ConnectionResetError, TimeoutError):
            pass
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return Answer(None, {}, b"", data)
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if m is None:
        return Answer(None, {}, b"", data)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Answer(int(m.group(1)), headers, body, data)


def build(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes | None,
          content_length: bool = True) -> bytes:
    out = [f"{method} ".encode() + path.encode("latin-1", errors="replace") + b" HTTP/1.1"]
    out.append(b"Host: 127.0.0.1")
    out += [k + b": " + v for k, v in headers]
    if body is not None and content_length:
        out.append(b"Content-Length: " + str(len(body)).encode())
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n" + (body or b"")


# -- values ----------------------------------------------------------------------------------------

UNICODE = ["²", "٣", "１２", "\u0000", "\u202e", "\ufeff", "é", "ключ", "✓", "\U0001f4b3", "\u00a0", "𝟘𝟙",
           "\\", "\"", "'", "%", "%00", "%C2%B2", "\r\n", "\t", "../", "..%2f", "{}", "[]", "null"]
WEIRD_INTS = ["²", "٣", "-1", "0", "101", "1e3", " 5", "5 ", "+5", "0x10", "05", "9" * 30, str(2**63),
              str(2**64 + 1), "", "1.0", "NaN", "%35", "５"]


def weird_text(rng: random.Random) -> str:
    k = rng.randint(1, 4)
    return "".join(rng.choice(UNICODE + ["a", "b", "x" * rng.randint(1, 300)]) for _ in range(k))


def weird_value(rng: random.Random, pans: list[str], depth: int = 0) -> object:
    roll = rng.random()
    if roll < 0.12:
        pan = new_pan(rng)
        pans.append(pan)
        return rng.choice((pan_form(rng, pan), int(pan), f"order {pan_form(rng, pan)}"))
    if roll < 0.25:
        return rng.choice((True, False, None, 0, -1, 2**63, 2**64 + 7, 1.5, -0.0, 1e308, ""))
    if roll < 0.45:
        return weird_text(rng)
    if roll < 0.55 and depth < 10:
        return [weird_value(rng, pans, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.65 and depth < 10:
        return {weird_text(rng)[:20]: weird_value(rng, pans, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(("tok_visa", "USD", "usd", "JPY", "XXX", "a" * 2000, "buyer@example.com", "203.0.113.7"))


def escaped(pan: str) -> str:
    """`pan` as a JSON string whose digits are \\u escapes (as the JSON text, quotes included)."""
    return '"' + "".join(f"\\u{ord(c):04x}" for c in pan) + '"'


def create_body(rng: random.Random, pans: list[str]) -> bytes:
    body: dict[str, object] = {"amount": rng.choice((1000, 1, 99_999_999)), "currency": "USD",
                               "payment_method": "tok_visa"}
    for _ in range(rng.randint(0, 3)):
        field_name = rng.choice(("amount", "currency", "payment_method", "capture", "description", "metadata",
                                 "customer", weird_text(rng)[:10]))
        body[field_name] = weird_value(rng, pans)
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5)
    roll = rng.random()
    if roll < 0.1:  # a duplicated key whose first value is a card number
        pan = luhn_complete("4" + "".join(rng.choice("0123456789") for _ in range(17)))
        pans.append(pan)
        text = '{"amount":' + pan + "," + text[1:]
    elif roll < 0.18:  # a card number hidden in escapes
        pan = new_pan(rng)
        pans.append(pan)
        text = text[:-1] + ', "description": ' + escaped(pan) + "}"
    elif roll < 0.24:  # a card number as a key
        pan = new_pan(rng)
        pans.append(pan)
        text = text[:-1] + ', "metadata": {"' + pan_form(rng, pan) + '": "x"}}'
    elif roll < 0.3:
        text = text[: rng.randint(0, len(text))]  # cut short
    elif roll < 0.34:
        return text.encode()[:-1] + bytes([rng.choice((0x80, 0xC3, 0xFF, 0xED))]) + b"}"  # invalid UTF-8
    elif roll < 0.37:
        text = "[" * rng.randint(9, 200) + "]" * rng.randint(0, 200)
    return text.encode()


# -- requests --------------------------------------------------------------------------------------


@dataclass
class Context:
    port: int
    api_key: str
    admin_key: str
    payments: list[str] = field(default_factory=list)


def _auth(ctx: Context) -> tuple[bytes, bytes]:
    return b"Authorization", f"Bearer {ctx.api_key}".encode()


def _admin(ctx: Context) -> tuple[bytes, bytes]:
    return b"Authorization", f"Bearer {ctx.admin_key}".encode()


def idem_key(rng: random.Random, pans: list[str]) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return f"key-{rng.getrandbits(48):x}".encode()
    if roll < 0.45:
        pan = new_pan(rng)
        pans.append(pan)
        return f"k-{pan_form(rng, pan)}".encode()
    if roll < 0.6:
        return "ключ-ü-✓".encode(rng.choice(("utf-8", "utf-8", "utf-8"))) + str(rng.random()).encode()
    if roll < 0.7:
        return b"latin-\xfc-" + str(rng.random()).encode()
    if roll < 0.8:
        return b"k" * rng.choice((255, 256, 1000))
    if roll < 0.9:
        return rng.choice((b"", b" ", b"a\x01b", b"a\x7fb", b"\t"))
    return weird_text(rng).encode("utf-8")


def query_value(rng: random.Random, pans: list[str]) -> str:
    roll = rng.random()
    if roll < 0.4:
        return quote(rng.choice(WEIRD_INTS))
    if roll < 0.6:
        pan = new_pan(rng)
        pans.append(pan)
        return rng.choice((pan, quote(_groups(pan, " ")), _groups(pan, "%20"), _groups(pan, "+")))
    return quote(weird_text(rng))


def list_query(rng: random.Random, pans: list[str], names: tuple[str, ...]) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(names)
        if rng.random() < 0.15:
            pan = new_pan(rng)
            pans.append(pan)
            name = pan_form(rng, pan).replace(" ", "%20")
        parts.append(f"{name}={query_value(rng, pans)}")
    return "&".join(parts)


def request(ctx: Context, seed: int, i: int) -> Request:
    rng = random.Random(f"{seed}:{i}")
    pans: list[str] = []
    family = rng.choice(("create", "create", "create", "create", "read", "list", "events", "operation",
                         "operation", "webhook", "admin", "admin", FRAMING, "headers", "replay", "routes"))
    headers: list[tuple[bytes, bytes]] = [_auth(ctx)]
    method, path, body = "GET", "/v1/payments", None
    if family == "create":
        method, body = "POST", create_body(rng, pans)
        if rng.random() < 0.5:
            headers.append((b"Idempotency-Key", idem_key(rng, pans)))
    elif family == "replay":  # the same keyed create twice: the second answer is the first one
        method = "POST"
        body = json.dumps({"amount": rng.randint(1, 10_000), "currency": "EUR", "payment_method": "tok_visa"}).encode()
        headers.append((b"Idempotency-Key", f"replay-{seed}-{i}".encode()))
    elif family == "routes":
        method, path, body = _route_request(rng, pans, ctx)
        if path.startswith("/v1/admin/"):
            headers = [_admin(ctx)]
    elif family == "read":
        roll = rng.random()
        if roll < 0.4 and ctx.payments:
            path = "/v1/payments/" + rng.choice(ctx.payments)
        elif roll < 0.7:
            pan = new_pan(rng)
            pans.append(pan)
            path = "/v1/payments/" + rng.choice((f"pay_{pan}", pan, _groups(pan, "%20"), quote(_groups(pan, "-"))))
        else:
            path = "/v1/payments/" + quote(weird_text(rng))[:300]
    elif family == "list":
        if rng.random() < 0.3:
            path = f"/v1/payments?limit={rng.randint(1, 100)}"
        else:
            path = "/v1/payments?" + list_query(rng, pans, ("limit", "starting_after", "limit", "x"))
    elif family == "events":
        pid = rng.choice(ctx.payments) if ctx.payments else "pay_" + "a" * 24
        path = f"/v1/events?payment={pid}&" + list_query(rng, pans, ("limit", "payment", "y"))
    elif family == "operation":
        pid = rng.choice(ctx.payments) if ctx.payments else "pay_" + "a" * 24
        method = "POST"
        path = f"/v1/payments/{pid}/" + rng.choice(("capture", "void", "refunds"))
        fields: dict[str, object] = {}
        for _ in range(rng.randint(0, 2)):
            fields[rng.choice(("amount", "reason", "final_capture", weird_text(rng)[:8]))] = weird_value(rng, pans)
        body = json.dumps(fields).encode()
        if rng.random() < 0.1:
            pan = luhn_complete("5" + "".join(rng.choice("0123456789") for _ in range(14)))
            pans.append(pan)
            body = b'{"reason":"' + pan.encode() + b'","reason":"ok"}'
        if rng.random() < 0.6:
            headers.append((b"Idempotency-Key", idem_key(rng, pans)))
    elif family == "webhook":
        method, path = "POST", "/v1/webhook_endpoints"
        pan = new_pan(rng)
        pans.append(pan)
        url = rng.choice((f"https://example.com/hook/{_groups(pan, '%20')}", f"https://example.com/?c={pan}",
                          f"https://example.com/{quote(_groups(pan, '-'))}", "https://example.com/ok",
                          "http://127.0.0.1/x", weird_text(rng)))
        body = json.dumps({"url": url, "description": weird_value(rng, pans)}).encode()
    elif family == "admin":
        method, path, body = _admin_request(rng, pans)
        headers = [_admin(ctx)]
    elif family == "headers":
        n = rng.choice((5, 70, 99, 120))
        headers += [(f"X-F{k}".encode(), b"v") for k in range(n)]
        if rng.random() < 0.5:
            headers.append((b"Upgrade", b"websocket"))
            headers.append((b"Connection", b"Upgrade"))
        if rng.random() < 0.5:
            headers.append((b"X-Big", b"a" * rng.choice((1000, 20000, 500000))))
        path = "/v1/payments?limit=1"
    else:  # FRAMING
        method, path = "POST", "/v1/payments"
        payload = create_body(rng, pans)
        kind = rng.choice(("short", "chunks", "both", "trailer"))
        if kind == "short":
            headers.append((b"Content-Length", str(len(payload) + rng.randint(1, 100)).encode()))
            raw = build(method, path, headers, None) + payload
            return Request(family, raw, method, path, pans, half_close=True)
        elif kind == "chunks":
            headers.append((b"Transfer-Encoding", b"chunked"))
            raw = build(method, path, headers, None) + b"zz\r\n" + payload + b"\r\n0\r\n\r\n"
        elif kind == "both":
            headers += [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")]
            raw = build(method, path, headers, None) + f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
        else:
            headers.append((b"Transfer-Encoding", b"chunked"))
            raw = (build(method, path, headers, None) + f"{len(payload):x}\r\n".encode() + payload
                   + b"\r\n0\r\nX-Bad trailer\r\n\r\n")
        return Request(family, raw, method, path, pans)
    return Request(family, build(method, path, headers, body), method, path, pans)


def _segment(rng: random.Random, pans: list[str]) -> str:
    roll = rng.random()
    if roll < 0.4:
        pan = new_pan(rng)
        pans.append(pan)
        return rng.choice((pan, _groups(pan, "%20"), f"evt_{pan}", quote(_groups(pan, "-"))))
    if roll < 0.6:
        return rng.choice(("%00", "%2F", "..", "%C2%B2", "a" * 300, "evt_" + "a" * 24, "we_x"))
    return quote(weird_text(rng))[:200]


def _route_request(rng: random.Random, pans: list[str], ctx: Context) -> tuple[str, str, bytes | None]:
    seg = _segment(rng, pans)
    return rng.choice((
        ("GET", f"/v1/events/{seg}", None),
        ("DELETE", f"/v1/webhook_endpoints/{seg}", None),
        ("GET", "/v1/webhook_endpoints", None),
        ("DELETE", f"/v1/admin/rules/merchants/{seg}", None),
        ("GET", f"/v1/admin/lists/{seg}", None),
        ("POST", f"/v1/admin/lists/{seg}/add", b'{"values":["x"]}'),
        (rng.choice(("PUT", "PATCH", "OPTIONS", "DELETE")), "/v1/payments", None),
        ("GET", f"/v1/{seg}", None),
        ("POST", f"/v1/payments/{seg}/capture", b"{}"),
    ))


def _admin_request(rng: random.Random, pans: list[str]) -> tuple[str, str, bytes | None]:
    def text() -> object:
        return weird_value(rng, pans) if rng.random() < 0.7 else "x" * rng.choice((199, 200, 201, 2001))

    roll = rng.randint(0, 6)
    if roll == 0:
        return "POST", "/v1/admin/rules", json.dumps(
            {"source": "", "author": text(), "comment": text()}).encode()
    if roll == 1:
        return "POST", "/v1/admin/rules/rollback", json.dumps(
            {"version": rng.choice((2**63, 2**64, -1, 0, 1, 10**30, "1")), "author": text()}).encode()
    if roll == 2:
        return "POST", "/v1/admin/lists", json.dumps(
            {"name": f"l{rng.getrandbits(32):x}", "kind": "string",
             "entries_max": rng.choice((2**63, 2**70, -5, 0, 10, None)), "author": text()}).encode()
    if roll == 3:
        return "POST", "/v1/admin/lists/fuzz/add", json.dumps(
            {"values": [weird_value(rng, pans) for _ in range(rng.randint(1, 3))], "author": text()}).encode()
    if roll == 4:
        return "GET", "/v1/admin/rules/history?" + list_query(rng, pans, ("limit", "before", "scope")), None
    if roll == 5:
        return "GET", "/v1/admin/audit?" + list_query(rng, pans, ("limit", "target")), None
    return "DELETE", "/v1/admin/rules/shadow?" + list_query(rng, pans, ("author", "comment")), None


# -- checks ----------------------------------------------------------------------------------------


def _digits(data: bytes) -> bytes:
    """`data` with the separators a card number may be written with removed (space, dash, `%20`, `+`),
    and `\\u00XX` escapes of digits decoded, so that any written form of a number is found."""
    data = re.sub(rb"\\u003([0-9])", rb"\1", data)
    return re.sub(rb"(?:%20|[ +\-])", b"", data)


def echoed_pans(pans: list[str], data: bytes) -> list[str]:
    flat = _digits(data)
    return [p for p in pans if p.encode() in flat]


def check(req: Request, ans: Answer) -> list[str]:
    """What is wrong with `ans` as the answer to `req` (empty when nothing is)."""
    problems = []
    if ans.status is None:
        if req.family not in (FRAMING, "headers"):
            problems.append("no answer")
        return problems
    if ans.status >= 500:
        problems.append(f"status {ans.status}")
    if echoed_pans(req.pans, ans.raw):
        problems.append("a card number of the request is echoed")
    if not ans.body and ans.status in GRANIAN_STATUSES:
        return problems  # granian's own answer to a request it could not parse (docs/http-edge.md)
    return problems + _check_shape(ans)


def _check_shape(ans: Answer) -> list[str]:
    try:
        obj = json.loads(ans.body)
    except ValueError:
        return [f"not JSON: {ans.body[:120]!r}"]
    if not isinstance(obj, dict):
        return ["not an object"]
    if "error" in obj:
        err = obj["error"]
        if set(obj) != {"error"} or not isinstance(err, dict) or not ERROR_FIELDS <= set(err) or (
                set(err) - ERROR_FIELDS - ERROR_EXTRA_FIELDS):
            return [f"not the error object: {ans.body[:200]!r}"]
        if ans.status is not None and ans.status < 400:
            return ["error object on a success"]
        return []
    if not ("object" in obj or "id" in obj or "valid" in obj):
        return [f"neither a resource nor the error object: {ans.body[:200]!r}"]
    if ans.status is not None and ans.status >= 400:
        return ["a resource on an error status"]
    return []


def files_with_pans(data_dir: Path, pans: list[str]) -> dict[str, list[str]]:
    """Every file under `data_dir` that holds one of `pans` (in any written form), with the numbers.

    Each file is read once: every window of each digit run (separators removed) as long as a card
    number is looked up in the set of numbers sent, so a long run's many numbers cost no more than a
    few."""
    found = {}
    wanted = set(pans)
    lengths = sorted({len(p) for p in wanted})
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file():
            continue
        hits: set[str] = set()
        for m in re.finditer(rb"[0-9]{%d,}" % (lengths[0] if lengths else 12), _digits(path.read_bytes())):
            run = m.group(0).decode()
            for n in lengths:
                hits.update(run[i:i + n] for i in range(len(run) - n + 1) if run[i:i + n] in wanted)
        if hits:
            found[str(path)] = sorted(hits)
    return found
