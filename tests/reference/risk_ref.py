"""Plain-Python reference implementation of the risk engine (`rust/risk`).

It is the oracle for property tests of the Rust engine and the baseline for benchmarks, so it favours
obviously-correct code over speed, while reproducing the Rust semantics exactly: the same card-token
table, currency table, list normalisation, bucketed velocity windows, rules language (same rule names,
errors with the same line, column and kind), XGBoost evaluation (f32 splits, f64 sums) and precedence.

Shapes shared with Rust (serde `RiskRequest` in, `Decision` out), documented in `docs/risk.md`:

    request  = {"merchant_id", "amount", "currency", "amount_usd"?, "card"?, "email"?, "ip"?,
                "ip_country"?, "device_id"?, "customer_id"?, "customer_country"?}
    decision = {"action", "risk_score", "decline_code", "rule", "matched_rules": [{"name", "action",
                "scope"}], "ruleset_version", "merchant_ruleset_version", "model_hash",
                "shadow_action", "shadow_ruleset_version"}

Not mirrored: velocity eviction (the reference keeps every key; compare below the Rust key limit) and
64-bit hash collisions of distinct counts (the reference compares strings).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------------
# Card tokens, currencies, context

TEST_BRANDS: dict[str, str] = {
    "visa": "424242",
    "mastercard": "555555",
    "amex": "378282",
    "discover": "601111",
    "jcb": "353011",
    "unionpay": "620000",
    "diners": "305693",
}

CURRENCIES: dict[str, tuple[int, float]] = {
    "USD": (2, 1.0),
    "EUR": (2, 1.08),
    "GBP": (2, 1.27),
    "CAD": (2, 0.73),
    "AUD": (2, 0.66),
    "CHF": (2, 1.13),
    "SEK": (2, 0.095),
    "JPY": (0, 0.0067),
    "KRW": (0, 0.00075),
    "INR": (2, 0.012),
    "BRL": (2, 0.2),
    "MXN": (2, 0.058),
}

_UPPER_TO_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
_LOWER_TO_UPPER = {c: c - 32 for c in range(ord("a"), ord("z") + 1)}


def ascii_lower(s: str) -> str:
    return s.translate(_UPPER_TO_LOWER)


def ascii_upper(s: str) -> str:
    return s.translate(_LOWER_TO_UPPER)


def _is_ascii_alpha(s: str) -> bool:
    return s.isascii() and s.isalpha()


def parse_country(s: str) -> str | None:
    return ascii_upper(s) if len(s) == 2 and _is_ascii_alpha(s) else None


def _brand_of_bin(bin_: str) -> str:
    return {"3": "amex", "4": "visa", "5": "mastercard", "6": "discover"}.get(bin_[:1], "unknown")


def card_attributes(token: str) -> tuple[str | None, str | None, str | None]:
    """`(bin, country, brand)` of a test token; see `rust/risk/src/card.rs` for the convention."""
    if not token.startswith("tok_"):
        return (None, None, None)
    parts = token[4:].split("_")
    head = parts[0]
    if not head:
        return (None, None, None)
    if head == "bin":
        bin_ = parts[1] if len(parts) > 1 else ""
        if len(bin_) != 6 or not (bin_.isascii() and bin_.isdigit()):
            return (None, None, "unknown")
        country = parse_country(parts[2]) if len(parts) > 2 else None
        return (bin_, country, _brand_of_bin(bin_))
    country = parse_country(parts[1]) if len(parts) > 1 else None
    if head in TEST_BRANDS:
        return (TEST_BRANDS[head], country or "US", head)
    return (None, country, "unknown")


def amount_to_usd(amount: int, currency: str) -> float | None:
    entry = CURRENCIES.get(ascii_upper(currency))
    if entry is None:
        return None
    exponent, rate = entry
    return amount / (10.0**exponent) * rate


def _non_empty(v: str | None) -> str | None:
    return v if v else None


REQUEST_FIELDS = (
    "merchant_id",
    "amount",
    "currency",
    "amount_usd",
    "card",
    "email",
    "ip",
    "ip_country",
    "device_id",
    "customer_id",
    "customer_country",
)


@dataclass
class Context:
    request: dict[str, Any]
    bin: str | None
    card_country: str | None
    brand: str | None
    email_domain: str | None
    amount_usd: float | None

    @staticmethod
    def of(request: dict[str, Any]) -> Context:
        unknown = set(request) - set(REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown request fields {sorted(unknown)}")
        card = _non_empty(request.get("card"))
        bin_, country, brand = card_attributes(card) if card else (None, None, None)
        email = _non_empty(request.get("email"))
        domain = None
        if email and "@" in email:
            domain = email.rsplit("@", 1)[1] or None
        usd = request.get("amount_usd")
        if usd is None:
            usd = amount_to_usd(request["amount"], request["currency"])
        return Context(request, bin_, country, brand, domain, usd)


# --------------------------------------------------------------------------------------------------
# Attributes

DIMS = ("card", "email", "ip", "device", "customer", "merchant")
DIM_FIELDS = ("card", "email", "ip", "device_id", "customer_id", "merchant_id")
WINDOWS = (("1m", 2_000, 30), ("1h", 60_000, 60), ("24h", 1_800_000, 48))
WINDOW_MS = (60_000, 3_600_000, 86_400_000)
DISTINCT = (
    ("cards_per_device", 3, 0),
    ("cards_per_email", 1, 0),
    ("cards_per_ip", 2, 0),
    ("cards_per_customer", 4, 0),
    ("emails_per_card", 0, 1),
    ("devices_per_card", 0, 3),
)
SCALARS = (
    "amount",
    "amount_usd",
    "risk_score",
    "card_ip_country_mismatch",
    "card_customer_country_mismatch",
)


def numeric_names() -> list[str]:
    names = list(SCALARS)
    for dim in DIMS:
        for win, _, _ in WINDOWS:
            names += [f"{dim}_count_{win}", f"{dim}_amount_usd_{win}"]
    for prefix, _, _ in DISTINCT:
        names += [f"{prefix}_{win}" for win, _, _ in WINDOWS]
    return names


NUMERIC = numeric_names()
NUMERIC_SET = frozenset(NUMERIC)
STRING_ATTRS = (
    "currency",
    "card",
    "card_bin",
    "card_brand",
    "card_country",
    "email",
    "email_domain",
    "ip",
    "ip_country",
    "device_id",
    "customer_id",
    "customer_country",
    "merchant_id",
)
CASE_INSENSITIVE = frozenset(
    ["currency", "card_brand", "card_country", "email", "email_domain", "ip_country", "customer_country"]
)
MODEL_FEATURE_NAMES = (
    "amount_usd",
    "card_ip_country_mismatch",
    "card_customer_country_mismatch",
    "card_count_1h",
    "card_count_24h",
    "card_amount_usd_24h",
    "ip_count_1h",
    "ip_count_24h",
    "email_count_24h",
    "device_count_1h",
    "cards_per_device_24h",
    "cards_per_email_24h",
    "cards_per_ip_24h",
    "customer_count_24h",
    "emails_per_card_24h",
)


def string_attr(ctx: Context, name: str) -> str | None:
    r = ctx.request
    derived = {
        "card_bin": ctx.bin,
        "card_brand": ctx.brand,
        "card_country": ctx.card_country,
        "email_domain": ctx.email_domain,
    }
    if name in derived:
        return derived[name]
    return _non_empty(r.get(name))


Features = dict[str, float | None]


def stateless_features(ctx: Context) -> Features:
    f: Features = {n: None for n in NUMERIC}
    f["amount"] = float(ctx.request["amount"])
    f["amount_usd"] = ctx.amount_usd
    cc = ctx.card_country

    def mismatch(other: str | None) -> float | None:
        if cc is None or other is None:
            return None
        return 0.0 if ascii_lower(cc) == ascii_lower(other) else 1.0

    f["card_ip_country_mismatch"] = mismatch(string_attr(ctx, "ip_country"))
    f["card_customer_country_mismatch"] = mismatch(string_attr(ctx, "customer_country"))
    return f


# --------------------------------------------------------------------------------------------------
# Lists

VALUE_LEN_MAX = 256
LIST_KINDS = ("card", "bin", "email", "ip", "device", "country", "string")
_KIND_ACCEPTS = {
    "card": {"card"},
    "bin": {"card_bin"},
    "email": {"email", "email_domain"},
    "ip": {"ip"},
    "device": {"device_id"},
    "country": {"card_country", "ip_country", "customer_country"},
}


class ListError(ValueError):
    pass


class RefList:
    def __init__(self, name: str, kind: str, entries_max: int = 1_000_000) -> None:
        if kind not in LIST_KINDS:
            raise ListError(f"unknown list kind {kind!r}")
        self.name, self.kind, self.entries_max = name, kind, entries_max
        self.values: set[bytes] = set()

    def accepts(self, attr: str) -> bool:
        return self.kind == "string" or attr in _KIND_ACCEPTS[self.kind]

    def _norm(self, value: str) -> bytes | None:
        b = value.encode()
        if len(b) > VALUE_LEN_MAX:
            return None
        if self.kind == "email":
            return ascii_lower(value).encode()
        if self.kind == "country":
            return ascii_upper(value).encode()
        return b

    def add(self, value: str) -> bool:
        if not value:
            raise ListError(f"empty value cannot be added to list @{self.name}")
        v = self._norm(value)
        if v is None:
            raise ListError(f"value too long for list @{self.name}")
        if v in self.values:
            return False
        if len(self.values) >= self.entries_max:
            raise ListError(f"list @{self.name} is full: at most {self.entries_max} entries")
        self.values.add(v)
        return True

    def remove(self, value: str) -> bool:
        v = self._norm(value)
        if v is None or v not in self.values:
            return False
        self.values.discard(v)
        return True

    def contains(self, attr: str, value: str) -> bool:
        v = self._norm(value)
        if v is None or not self.values:
            return False
        if self.kind != "email":
            return v in self.values
        if attr == "email":
            if v in self.values:
                return True
            if b"@" not in v:
                return False
            domain = v.rsplit(b"@", 1)[1]
        else:
            domain = v
        while domain and b"." in domain:
            if domain in self.values:
                return True
            domain = domain.split(b".", 1)[1]
        return False


# --------------------------------------------------------------------------------------------------
# Velocity


class Ring:
    def __init__(self, bucket_ms: int, n: int) -> None:
        self.bucket_ms, self.n = bucket_ms, n
        self.bucket = 0
        self.count = 0
        self.cents = 0
        self.counts = [0] * n
        self.sums = [0] * n

    def advance(self, bucket: int) -> None:
        if bucket <= self.bucket:
            return
        if bucket - self.bucket >= self.n or self.count == 0:
            self.counts = [0] * self.n
            self.sums = [0] * self.n
            self.count = 0
            self.cents = 0
        else:
            for b in range(self.bucket + 1, bucket + 1):
                i = b % self.n
                self.count -= self.counts[i]
                self.cents -= self.sums[i]
                self.counts[i] = 0
                self.sums[i] = 0
        self.bucket = bucket

    def add(self, now_ms: int, cents: int) -> None:
        self.advance(now_ms // self.bucket_ms)
        i = self.bucket % self.n
        self.counts[i] += 1
        self.sums[i] += cents
        self.count += 1
        self.cents += cents


DISTINCT_MEMBERS_MAX = 64
KEY_LEN_MAX = 256


@dataclass
class Entry:
    rings: list[Ring] = field(default_factory=lambda: [Ring(ms, n) for _, ms, n in WINDOWS])
    distinct: list[dict[str, int]] = field(default_factory=lambda: [{}, {}])
    last_seen_ms: int = 0


def _touch(members: dict[str, int], member: str, now_ms: int) -> None:
    if member in members:
        members[member] = max(members[member], now_ms)
    elif len(members) < DISTINCT_MEMBERS_MAX:
        members[member] = now_ms
    else:
        oldest = min(members, key=lambda m: members[m])
        if members[oldest] <= now_ms:
            del members[oldest]
            members[member] = now_ms


class VelocityStore:
    def __init__(self) -> None:
        self.dims: list[dict[str, Entry]] = [{} for _ in DIMS]
        self.owned = [
            [(i, member) for i, (_, owner, member) in enumerate(DISTINCT) if owner == d]
            for d in range(len(DIMS))
        ]

    def observe(self, ctx: Context, now_ms: int, record: bool, out: Features) -> None:
        keys = []
        for f in DIM_FIELDS:
            k = _non_empty(ctx.request.get(f))
            keys.append(k if k is not None and len(k.encode()) <= KEY_LEN_MAX else None)
        usd = ctx.amount_usd
        cents = max(math.floor(usd * 100.0 + 0.5), 0) if usd is not None else 0
        for d, key in enumerate(keys):
            if key is None:
                continue
            table = self.dims[d]
            if record:
                entry = table.setdefault(key, Entry())
            else:
                entry = copy.deepcopy(table[key]) if key in table else Entry()
            for ring in entry.rings:
                ring.add(now_ms, cents)
            entry.last_seen_ms = max(entry.last_seen_ms, now_ms)
            for w, (win, _, _) in enumerate(WINDOWS):
                out[f"{DIMS[d]}_count_{win}"] = float(entry.rings[w].count)
                out[f"{DIMS[d]}_amount_usd_{win}"] = entry.rings[w].cents / 100.0
            for slot, (pair, member_dim) in enumerate(self.owned[d]):
                members = entry.distinct[slot]
                member = keys[member_dim]
                if member is not None:
                    _touch(members, member, now_ms)
                for w, (win, _, _) in enumerate(WINDOWS):
                    n = sum(1 for t in members.values() if t + WINDOW_MS[w] > now_ms)
                    out[f"{DISTINCT[pair][0]}_{win}"] = float(n)


# --------------------------------------------------------------------------------------------------
# Rules


class RuleError(Exception):
    def __init__(self, line: int, column: int, kind: str, message: str) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.line, self.column, self.kind, self.message = line, column, kind, message


class RulesError(ValueError):
    def __init__(self, errors: list[RuleError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


ACTIONS = ("allow", "block", "challenge", "review")
PRIORITY = {"allow": 4, "block": 3, "challenge": 2, "review": 1}
FLIP = {">": "<", ">=": "<=", "<": ">", "<=": ">=", "=": "=", "!=": "!="}
RULES_MAX = 10_000
LINE_LEN_MAX = 4_096
EXPR_DEPTH_MAX = 32
LIST_PROBES_MAX = 256
_WS = frozenset(b" \t\n\r\x0c")


def _is_word_start(c: int) -> bool:
    return (65 <= c <= 90) or (97 <= c <= 122) or c == 95


def _is_word(c: int) -> bool:
    return _is_word_start(c) or (48 <= c <= 57)


@dataclass
class Tok:
    kind: str  # word attr list str num op ( ) :
    value: Any
    column: int


def _fmt_num(n: float) -> str:
    return str(int(n)) if n == int(n) and abs(n) < 1e16 else repr(n)


def lex(line: str, line_no: int) -> list[Tok]:
    b = line.encode()
    out: list[Tok] = []
    i = 0

    def err(column: int, message: str) -> RuleError:
        return RuleError(line_no, column, "syntax", message)

    while i < len(b):
        c = b[i]
        column = i + 1
        if c in _WS:
            i += 1
            continue
        if c == 40:
            out.append(Tok("(", None, column))
            i += 1
        elif c == 41:
            out.append(Tok(")", None, column))
            i += 1
        elif c == 58:  # ':'
            j = i + 1
            while j < len(b) and _is_word(b[j]):
                j += 1
            if j > i + 1 and j < len(b) and b[j] == 58:
                out.append(Tok("attr", b[i + 1 : j].decode(), column))
                i = j + 1
            else:
                out.append(Tok(":", None, column))
                i += 1
        elif c == 64:  # '@'
            j = i + 1
            while j < len(b) and _is_word(b[j]):
                j += 1
            if j == i + 1:
                raise err(column, "expected a list name after '@'")
            out.append(Tok("list", b[i + 1 : j].decode(), column))
            i = j
        elif c in (39, 34):
            end = b.find(bytes([c]), i + 1)
            if end < 0:
                raise err(column, "unterminated string literal")
            out.append(Tok("str", b[i + 1 : end].decode(), column))
            i = end + 1
        elif c == 61:
            i += 2 if i + 1 < len(b) and b[i + 1] == 61 else 1
            out.append(Tok("op", "=", column))
        elif c == 33 and i + 1 < len(b) and b[i + 1] == 61:
            i += 2
            out.append(Tok("op", "!=", column))
        elif c in (62, 60):
            eq = i + 1 < len(b) and b[i + 1] == 61
            out.append(Tok("op", (">" if c == 62 else "<") + ("=" if eq else ""), column))
            i += 2 if eq else 1
        elif (48 <= c <= 57) or c in (45, 46):
            j = i + 1
            while j < len(b) and ((48 <= b[j] <= 57) or b[j] in (46, 95)):
                j += 1
            raw = b[i:j].decode()
            text = raw.replace("_", "")
            try:
                n = float(text)
            except ValueError:
                raise err(column, f"invalid number {raw!r}") from None
            if not math.isfinite(n) or not _rust_float_syntax(text):
                raise err(column, f"invalid number {raw!r}")
            out.append(Tok("num", n, column))
            i = j
        elif _is_word_start(c):
            j = i + 1
            while j < len(b) and (_is_word(b[j]) or b[j] == 45):
                j += 1
            out.append(Tok("word", b[i:j].decode(), column))
            i = j
        else:
            ch = b[i:].decode(errors="replace")[:1]
            raise err(column, f"unexpected character {ch!r}")
    return out


def _rust_float_syntax(text: str) -> bool:
    """Rust's f64 parser rejects a few forms Python accepts; the lexer only produces [-0-9.]."""
    body = text.removeprefix("-")
    return bool(body) and body != "." and body.count(".") <= 1 and "-" not in body


# Expressions are tuples: ("or", [e..]) ("and", [e..]) ("not", e) ("numlit", attr, op, lit)
# ("numattr", a, op, b) ("strlit", attr, negated, lit) ("strattr", a, negated, b) ("in", probe)


@dataclass
class Rule:
    name: str
    action: str
    line: int
    decline_code: str
    expr: Any


@dataclass
class Ruleset:
    version: int
    rules: list[Rule]
    probes: list[tuple[str, RefList]]


class _Parser:
    def __init__(
        self,
        toks: list[Tok],
        line: int,
        line_len: int,
        lists: dict[str, RefList],
        probes: list[tuple[str, RefList]],
    ) -> None:
        self.toks, self.pos, self.line, self.line_len = toks, 0, line, line_len
        self.lists, self.probes = lists, probes
        self.uses = {"list": False, "velocity": False, "risk_score": False}
        self.depth = 0

    def err(self, column: int, kind: str, message: str) -> RuleError:
        return RuleError(self.line, column, kind, message)

    def column(self) -> int:
        return self.toks[self.pos].column if self.pos < len(self.toks) else self.line_len + 1

    def peek(self) -> Tok | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def peek_word(self, w: str) -> bool:
        t = self.peek()
        return t is not None and t.kind == "word" and t.value == w

    def unexpected(self, expected: str) -> RuleError:
        t = self.peek()
        found = "end of line" if t is None else _describe(t)
        return self.err(self.column(), "syntax", f"expected {expected}, found {found}")

    def rule(self) -> tuple[str | None, str, Any]:
        name = None
        t = self.peek()
        if (
            t is not None
            and t.kind == "word"
            and self.pos + 1 < len(self.toks)
            and self.toks[self.pos + 1].kind == ":"
        ):
            name = t.value
            self.pos += 2
        t = self.peek()
        if t is None or t.kind != "word" or t.value not in ACTIONS:
            raise self.unexpected("an action (allow, block, challenge, review)")
        action = t.value
        self.pos += 1
        if not self.peek_word("if"):
            raise self.unexpected("'if'")
        self.pos += 1
        expr = self.expr()
        if self.pos < len(self.toks):
            raise self.unexpected("'and', 'or' or end of line")
        return name, action, expr

    def expr(self) -> Any:
        self.depth += 1
        if self.depth > EXPR_DEPTH_MAX:
            raise self.err(self.column(), "limit", f"expression nested deeper than {EXPR_DEPTH_MAX}")
        terms = [self.and_()]
        while self.peek_word("or"):
            self.pos += 1
            terms.append(self.and_())
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("or", terms)

    def and_(self) -> Any:
        terms = [self.unary()]
        while self.peek_word("and"):
            self.pos += 1
            terms.append(self.unary())
        return terms[0] if len(terms) == 1 else ("and", terms)

    def unary(self) -> Any:
        if self.peek_word("not"):
            self.pos += 1
            self.depth += 1
            if self.depth > EXPR_DEPTH_MAX:
                raise self.err(self.column(), "limit", f"expression nested deeper than {EXPR_DEPTH_MAX}")
            inner = self.unary()
            self.depth -= 1
            return ("not", inner)
        t = self.peek()
        if t is not None and t.kind == "(":
            self.pos += 1
            e = self.expr()
            t = self.peek()
            if t is None or t.kind != ")":
                raise self.unexpected("')'")
            self.pos += 1
            return e
        left = self.operand()
        op_column = self.column()
        negated = self.peek_word("not")
        if negated or self.peek_word("in"):
            if negated:
                self.pos += 1
                if not self.peek_word("in"):
                    raise self.unexpected("'in'")
            self.pos += 1
            list_column = self.column()
            t = self.peek()
            if t is None or t.kind != "list":
                raise self.unexpected("a list (@name)")
            self.pos += 1
            kind, value, col = left
            if kind == "num_attr":
                raise self.err(
                    col, "type_mismatch", f"numeric attribute :{value}: cannot be looked up in a list"
                )
            if kind != "str_attr":
                raise self.err(col, "type_mismatch", "only an attribute can be looked up in a list")
            lst = self.lists.get(t.value)
            if lst is None:
                raise self.err(list_column, "unknown_list", f"unknown list @{t.value}")
            if not lst.accepts(value):
                raise self.err(
                    op_column,
                    "type_mismatch",
                    f"attribute :{value}: cannot be looked up in @{t.value}, a {lst.kind} list",
                )
            for idx, (a, l) in enumerate(self.probes):
                if a == value and l is lst:
                    probe = idx
                    break
            else:
                if len(self.probes) >= LIST_PROBES_MAX:
                    raise self.err(
                        list_column,
                        "limit",
                        f"more than {LIST_PROBES_MAX} distinct list lookups in one ruleset",
                    )
                self.probes.append((value, lst))
                probe = len(self.probes) - 1
            if not negated:
                self.uses["list"] = True
            e = ("in", probe)
            return ("not", e) if negated else e
        t = self.peek()
        if t is None or t.kind != "op":
            raise self.unexpected("a comparison operator (= != > >= < <=) or 'in'")
        self.pos += 1
        right = self.operand()
        return self.comparison(left, t.value, op_column, right)

    def operand(self) -> tuple[str, Any, int]:
        column = self.column()
        t = self.peek()
        if t is not None and t.kind == "attr":
            if t.value in NUMERIC_SET:
                if t.value == "risk_score":
                    self.uses["risk_score"] = True
                elif t.value not in SCALARS:
                    self.uses["velocity"] = True
                op = ("num_attr", t.value, column)
            elif t.value in STRING_ATTRS:
                op = ("str_attr", t.value, column)
            else:
                raise self.err(column, "unknown_attribute", f"unknown attribute :{t.value}:")
        elif t is not None and t.kind == "str":
            op = ("str", t.value, column)
        elif t is not None and t.kind == "num":
            op = ("num", t.value, column)
        else:
            raise self.unexpected("an attribute (:name:), a string or a number")
        self.pos += 1
        return op

    def comparison(
        self, left: tuple[str, Any, int], op: str, column: int, right: tuple[str, Any, int]
    ) -> Any:
        def mismatch(msg: str) -> RuleError:
            return self.err(column, "type_mismatch", msg)

        def string_negated() -> bool:
            if op == "=":
                return False
            if op == "!=":
                return True
            raise mismatch(f"operator {op} needs numbers; strings compare only with = and !=")

        lk, lv, _ = left
        rk, rv, _ = right
        if lk == "num_attr" and rk == "num":
            return ("numlit", lv, op, rv)
        if lk == "num" and rk == "num_attr":
            return ("numlit", rv, FLIP[op], lv)
        if lk == "num_attr" and rk == "num_attr":
            return ("numattr", lv, op, rv)
        if lk == "str_attr" and rk == "str":
            return ("strlit", lv, string_negated(), rv)
        if lk == "str" and rk == "str_attr":
            return ("strlit", rv, string_negated(), lv)
        if lk == "str_attr" and rk == "str_attr":
            return ("strattr", lv, string_negated(), rv)
        if {lk, rk} == {"num_attr", "str"}:
            a, s = (lv, rv) if lk == "num_attr" else (rv, lv)
            raise mismatch(f"cannot compare numeric attribute :{a}: with string {json.dumps(s)}")
        if {lk, rk} == {"str_attr", "num"}:
            a, n = (lv, rv) if lk == "str_attr" else (rv, lv)
            raise mismatch(f"cannot compare string attribute :{a}: with number {_fmt_num(n)}")
        if lk == "num_attr" and rk == "str_attr":
            raise mismatch(f"cannot compare numeric attribute :{lv}: with string attribute :{rv}:")
        if lk == "str_attr" and rk == "num_attr":
            raise mismatch(f"cannot compare string attribute :{lv}: with numeric attribute :{rv}:")
        raise mismatch("a comparison needs at least one attribute")


def _describe(t: Tok) -> str:
    return {
        "word": lambda: f"'{t.value}'",
        "attr": lambda: f"attribute :{t.value}:",
        "list": lambda: f"list @{t.value}",
        "str": lambda: f"string {json.dumps(t.value)}",
        "num": lambda: f"number {_fmt_num(t.value)}",
        "op": lambda: f"operator {t.value}",
        "(": lambda: "'('",
        ")": lambda: "')'",
        ":": lambda: "':'",
    }[t.kind]()


def strip_comment(line: str) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote is None and c == "#":
            return line[:i]
        if quote is None and c in "'\"":
            quote = c
        elif quote is not None and c == quote:
            quote = None
    return line


def compile_rules(source: str, version: int, lists: dict[str, RefList]) -> Ruleset:
    rules: list[Rule] = []
    probes: list[tuple[str, RefList]] = []
    errors: list[RuleError] = []
    names: set[str] = set()
    lines = source.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for idx, raw in enumerate(lines):
        raw = raw.removesuffix("\r")
        line_no = idx + 1
        if len(raw.encode()) > LINE_LEN_MAX:
            errors.append(
                RuleError(line_no, LINE_LEN_MAX + 1, "limit", f"line longer than {LINE_LEN_MAX} bytes")
            )
            continue
        text = strip_comment(raw)
        if not text.strip():
            continue
        try:
            toks = lex(text, line_no)
            name, action, expr = (
                p := _Parser(toks, line_no, len(text.rstrip().encode()), lists, probes)
            ).rule()
        except RuleError as e:
            errors.append(e)
            continue
        name = name if name is not None else f"rule_{line_no}"
        if not (0 < len(name.encode()) <= 64) or name in names:
            errors.append(
                RuleError(
                    line_no,
                    toks[0].column if toks else 1,
                    "duplicate_name",
                    f"rule name {name!r} is already used (or longer than 64)",
                )
            )
            continue
        names.add(name)
        if len(rules) >= RULES_MAX:
            errors.append(RuleError(line_no, 1, "limit", f"more than {RULES_MAX} rules"))
            break
        if p.uses["list"]:
            code = "blocklisted"
        elif p.uses["velocity"]:
            code = "velocity_exceeded"
        elif p.uses["risk_score"]:
            code = "highest_risk_level"
        else:
            code = "fraudulent"
        rules.append(Rule(name, action, line_no, code, expr))
    if errors:
        raise RulesError(errors)
    return Ruleset(version, rules, probes)


def _cmp(x: float | None, op: str, y: float | None) -> bool:
    if x is None or y is None or math.isnan(x) or math.isnan(y):
        return False
    return {
        "=": x == y,
        "!=": x != y,
        ">": x > y,
        ">=": x >= y,
        "<": x < y,
        "<=": x <= y,
    }[op]


def _str_eq(a: str, b: str, ci: bool) -> bool:
    return ascii_lower(a) == ascii_lower(b) if ci else a == b


def evaluate_expr(e: Any, ctx: Context, f: Features, hits: list[bool]) -> bool:
    tag = e[0]
    if tag == "or":
        return any(evaluate_expr(t, ctx, f, hits) for t in e[1])
    if tag == "and":
        return all(evaluate_expr(t, ctx, f, hits) for t in e[1])
    if tag == "not":
        return not evaluate_expr(e[1], ctx, f, hits)
    if tag == "numlit":
        return _cmp(f[e[1]], e[2], e[3])
    if tag == "numattr":
        return _cmp(f[e[1]], e[2], f[e[3]])
    if tag == "strlit":
        v = string_attr(ctx, e[1])
        return v is not None and _str_eq(v, e[3], e[1] in CASE_INSENSITIVE) != e[2]
    if tag == "strattr":
        a, b = string_attr(ctx, e[1]), string_attr(ctx, e[3])
        ci = e[1] in CASE_INSENSITIVE or e[3] in CASE_INSENSITIVE
        return a is not None and b is not None and _str_eq(a, b, ci) != e[2]
    if tag == "in":
        return hits[e[1]]
    raise AssertionError(e)


def probe_lists(rs: Ruleset, ctx: Context) -> list[bool]:
    out = []
    for attr, lst in rs.probes:
        v = string_attr(ctx, attr)
        out.append(v is not None and lst.contains(attr, v))
    return out


def matching_rules(rs: Ruleset, ctx: Context, f: Features) -> list[Rule]:
    hits = probe_lists(rs, ctx)
    return [r for r in rs.rules if evaluate_expr(r.expr, ctx, f, hits)]


def best_rule(matched: Iterable[Rule]) -> Rule | None:
    best: Rule | None = None
    for r in matched:
        if best is None or PRIORITY[r.action] > PRIORITY[best.action]:
            best = r
    return best


# --------------------------------------------------------------------------------------------------
# Model


def f32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


class Model:
    def __init__(self, data: bytes) -> None:
        doc = json.loads(data)
        learner = doc["learner"]
        if learner["objective"]["name"] != "binary:logistic":
            raise ValueError("unsupported objective")
        base = learner["learner_model_param"]["base_score"]
        base = float(str(base).strip().strip("[]").strip())
        self.base_margin = math.log(base / (1.0 - base))
        self.trees = []
        for t in learner["gradient_booster"]["model"]["trees"]:
            dl = [bool(v) for v in t["default_left"]]
            self.trees.append(
                (
                    t["left_children"],
                    t["right_children"],
                    t["split_indices"],
                    [f32(c) for c in t["split_conditions"]],
                    dl,
                )
            )
        self.sha256_hex = hashlib.sha256(data).hexdigest()
        self.short_hash = self.sha256_hex[:12]

    def margin(self, x: list[float | None]) -> float:
        xf = [None if v is None or math.isnan(v) else f32(v) for v in x]
        total = self.base_margin
        for left, right, index, cond, default_left in self.trees:
            i = 0
            while left[i] != -1:
                v = xf[index[i]]
                go_left = default_left[i] if v is None else v < cond[i]
                i = left[i] if go_left else right[i]
            total += cond[i]
        return total

    def probability(self, x: list[float | None]) -> float:
        return 1.0 / (1.0 + math.exp(-self.margin(x)))

    def score(self, f: Features) -> int:
        p = self.probability([f[n] for n in MODEL_FEATURE_NAMES])
        return int(min(max(math.floor(100.0 * p + 0.5), 0.0), 100.0))


# --------------------------------------------------------------------------------------------------
# Engine

_RANK = {
    ("allow", "global"): 8,
    ("block", "global"): 7,
    ("allow", "merchant"): 6,
    ("block", "merchant"): 5,
    ("challenge", "global"): 4,
    ("challenge", "merchant"): 3,
    ("review", "global"): 2,
    ("review", "merchant"): 1,
}


def combine(g: Rule | None, m: Rule | None) -> Rule | None:
    if g is not None and m is not None:
        return g if _RANK[(g.action, "global")] >= _RANK[(m.action, "merchant")] else m
    return g if g is not None else m


class Engine:
    def __init__(self, shadow_samples_max: int = 100) -> None:
        self.lists: dict[str, RefList] = {}
        self.velocity = VelocityStore()
        self.model: Model | None = None
        self.global_rules = Ruleset(0, [], [])
        self.merchant_rules: dict[str, Ruleset] = {}
        self.shadow: Ruleset | None = None
        self.shadow_samples_max = shadow_samples_max
        self._reset_shadow()

    def _reset_shadow(self) -> None:
        self.shadow_evaluated = 0
        self.shadow_differences = 0
        self.shadow_by_actions: dict[tuple[str, str], int] = {}
        self.shadow_samples: deque[dict[str, Any]] = deque()

    def create_list(self, name: str, kind: str, entries_max: int | None = None) -> RefList:
        if name in self.lists:
            raise ListError(f"list @{name} already exists")
        lst = RefList(name, kind, entries_max or 1_000_000)
        self.lists[name] = lst
        return lst

    def compile_rules(self, source: str, version: int) -> Ruleset:
        return compile_rules(source, version, self.lists)

    def set_global_rules(self, rs: Ruleset) -> None:
        self.global_rules = rs

    def set_merchant_rules(self, merchant_id: str, rs: Ruleset | None) -> None:
        if rs is None:
            self.merchant_rules.pop(merchant_id, None)
        else:
            self.merchant_rules[merchant_id] = rs

    def set_shadow_rules(self, rs: Ruleset | None) -> None:
        self.shadow = rs
        self._reset_shadow()

    def load_model(self, data: bytes) -> str:
        self.model = Model(data)
        return self.model.short_hash

    def features(self, ctx: Context, now_ms: int, record: bool) -> Features:
        f = stateless_features(ctx)
        self.velocity.observe(ctx, now_ms, record, f)
        return f

    def decide(self, request: dict[str, Any], now_ms: int, record: bool = True) -> dict[str, Any]:
        ctx = Context.of(request)
        f = self.features(ctx, now_ms, record)
        score = self.model.score(f) if self.model is not None else None
        if score is not None:
            f["risk_score"] = float(score)
        g = self.global_rules
        m = self.merchant_rules.get(request["merchant_id"])
        g_matched = matching_rules(g, ctx, f)
        m_matched = matching_rules(m, ctx, f) if m is not None else []
        best_m = best_rule(m_matched)
        deciding = combine(best_rule(g_matched), best_m)
        action = deciding.action if deciding is not None else "allow"
        shadow_action = None
        shadow_rule = None
        if self.shadow is not None:
            shadow_rule = combine(best_rule(matching_rules(self.shadow, ctx, f)), best_m)
            shadow_action = shadow_rule.action if shadow_rule is not None else "allow"
            if record:
                self.shadow_evaluated += 1
                key = (action, shadow_action)
                self.shadow_by_actions[key] = self.shadow_by_actions.get(key, 0) + 1
                if shadow_action != action:
                    self.shadow_differences += 1
                    if self.shadow_samples_max > 0:
                        if len(self.shadow_samples) >= self.shadow_samples_max:
                            self.shadow_samples.popleft()
                        self.shadow_samples.append(
                            {
                                "now_ms": now_ms,
                                "merchant_id": request["merchant_id"],
                                "live_action": action,
                                "live_rule": deciding.name if deciding else None,
                                "shadow_action": shadow_action,
                                "shadow_rule": shadow_rule.name if shadow_rule else None,
                                "risk_score": score,
                            }
                        )
        matched = [{"name": r.name, "action": r.action, "scope": "global"} for r in g_matched]
        matched += [{"name": r.name, "action": r.action, "scope": "merchant"} for r in m_matched]
        return {
            "action": action,
            "risk_score": score,
            "decline_code": deciding.decline_code if deciding is not None and action == "block" else None,
            "rule": deciding.name if deciding is not None else None,
            "matched_rules": matched,
            "ruleset_version": g.version,
            "merchant_ruleset_version": m.version if m is not None else None,
            "model_hash": self.model.short_hash if self.model is not None else None,
            "shadow_action": shadow_action,
            "shadow_ruleset_version": self.shadow.version if self.shadow is not None else None,
        }

    def simulate(self, request: dict[str, Any], now_ms: int) -> dict[str, Any]:
        return self.decide(request, now_ms, record=False)

    def decide_json(self, request_json: str, now_ms: int) -> str:
        return json.dumps(self.decide(json.loads(request_json), now_ms))

    def shadow_stats(self) -> dict[str, Any]:
        return {
            "shadow_ruleset_version": self.shadow.version if self.shadow is not None else None,
            "evaluated": self.shadow_evaluated,
            "differences": self.shadow_differences,
            "by_actions": sorted([a, s, n] for (a, s), n in self.shadow_by_actions.items()),
            "samples": list(self.shadow_samples),
        }


__all__ = [
    "Context",
    "Engine",
    "ListError",
    "Model",
    "RefList",
    "RuleError",
    "RulesError",
    "Ruleset",
    "card_attributes",
    "compile_rules",
]
