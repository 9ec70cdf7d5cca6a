"""Differential check: random scenarios through the Rust engine and the Python reference.

Until the Python binding exposes the engine, the Rust side runs as the `decide_scenario` example:

    cargo build -p risk --example decide_scenario
    python tests/reference/compare_with_rust.py --bin target/debug/examples/decide_scenario --seeds 200

Each scenario has random lists, a random global ruleset (sometimes with syntax or type errors, whose
line, column and kind must agree), a merchant ruleset, a shadow ruleset, the shipped model and a stream of
payments over small pools of cards, e-mails, IPs and devices with times that jump forward, repeat and
sometimes go backwards. Every decision and the final shadow statistics must be identical.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import risk_ref as rr

ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = ROOT / "python" / "gateway" / "risk" / "model.json"

CARDS = ["tok_visa", "tok_visa_gb", "tok_mastercard_de", "tok_amex_fr", "tok_bin_411111_us", "tok_zzz", ""]
EMAILS = ["a@example.com", "B@Mailinator.com", "c@eu.mailinator.com", "d@gmail.com", "bad", ""]
IPS = ["10.0.0.1", "10.0.0.2", "192.168.1.1", ""]
DEVICES = ["dev1", "dev2", "dev3", ""]
COUNTRIES = ["US", "gb", "DE", "FR", ""]
CUSTOMERS = ["cus_1", "cus_2", "cus_vip", ""]
CURRENCIES = ["USD", "EUR", "JPY", "XXX"]
LISTS = {
    "disposable": ("email", ["mailinator.com", "d@gmail.com"]),
    "blocked_cards": ("card", ["tok_amex_fr", "tok_zzz"]),
    "vip": ("string", ["cus_vip", "m2"]),
    "risky_countries": ("country", ["de", "FR"]),
    "bad_ips": ("ip", ["192.168.1.1"]),
    "bins": ("bin", ["411111"]),
}
STR_LITERALS = {
    "card_country": COUNTRIES,
    "ip_country": COUNTRIES,
    "customer_country": COUNTRIES,
    "currency": ["usd", "EUR"],
    "card_brand": ["visa", "AMEX", "unknown"],
    "card_bin": ["424242", "411111"],
    "email_domain": ["mailinator.com", "example.com"],
    "merchant_id": ["m1", "m2"],
    "customer_id": CUSTOMERS,
    "device_id": DEVICES,
    "card": CARDS,
    "email": EMAILS,
    "ip": IPS,
}
LIST_FOR = {
    "email": ["disposable", "vip"],
    "email_domain": ["disposable"],
    "card": ["blocked_cards", "vip"],
    "customer_id": ["vip"],
    "merchant_id": ["vip"],
    "ip_country": ["risky_countries"],
    "card_country": ["risky_countries"],
    "ip": ["bad_ips"],
    "card_bin": ["bins"],
}
THRESHOLDS = [0, 1, 2, 3, 4, 5, 10, 50, 75, 100, 500, 1000, 5000, 12.5]


def atom(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.45:
        attr = rng.choice(rr.NUMERIC)
        op = rng.choice([">", ">=", "<", "<=", "=", "!="])
        if rng.random() < 0.1:
            return f"{rng.choice(THRESHOLDS)} {op} :{attr}:"
        if rng.random() < 0.1:
            return f":{attr}: {op} :{rng.choice(rr.NUMERIC)}:"
        return f":{attr}: {op} {rng.choice(THRESHOLDS)}"
    if k < 0.7:
        attr = rng.choice(list(STR_LITERALS))
        quote = rng.choice("'\"")
        return f":{attr}: {rng.choice(['=', '!=', '=='])} {quote}{rng.choice(STR_LITERALS[attr])}{quote}"
    if k < 0.8:
        a, b = (
            rng.choice(["card_country", "ip_country", "customer_country"]),
            rng.choice(["card_country", "ip_country", "customer_country", "email_domain"]),
        )
        return f":{a}: {rng.choice(['=', '!='])} :{b}:"
    attr = rng.choice(list(LIST_FOR))
    return f":{attr}: {rng.choice(['in', 'not in'])} @{rng.choice(LIST_FOR[attr])}"


def expr(rng: random.Random, depth: int = 0) -> str:
    if depth >= 3 or rng.random() < 0.45:
        return atom(rng)
    k = rng.random()
    if k < 0.15:
        return f"not {expr(rng, depth + 1)}"
    if k < 0.3:
        return f"({expr(rng, depth + 1)})"
    return f"{expr(rng, depth + 1)} {rng.choice(['and', 'or'])} {expr(rng, depth + 1)}"


def ruleset(rng: random.Random, n: int, prefix: str, broken: bool) -> str:
    lines = []
    for i in range(n):
        line = f"{rng.choice(rr.ACTIONS)} if {expr(rng)}"
        if rng.random() < 0.4:
            line = f"{prefix}{i}: {line}"
        if rng.random() < 0.2:
            line += "  # note"
        if broken and rng.random() < 0.3:
            pos = rng.randrange(len(line))
            if rng.random() < 0.5:
                line = line[:pos] + line[pos + 1 :]
            else:
                line = line[:pos] + rng.choice("():@'<>=!x9 #") + line[pos:]
        lines.append(line)
        if rng.random() < 0.1:
            lines.append("# comment")
    return "\n".join(lines) + "\n"


def request(rng: random.Random) -> dict[str, Any]:
    req: dict[str, Any] = {
        "merchant_id": rng.choice(["m1", "m2"]),
        "amount": rng.choice([0, 100, 999, 5_000, 60_000, 750_000]),
        "currency": rng.choice(CURRENCIES),
    }
    if rng.random() < 0.2:
        req["amount_usd"] = rng.choice([1.5, 99.99, 6000.0])
    for key, pool in (
        ("card", CARDS),
        ("email", EMAILS),
        ("ip", IPS),
        ("ip_country", COUNTRIES),
        ("device_id", DEVICES),
        ("customer_id", CUSTOMERS),
        ("customer_country", COUNTRIES),
    ):
        if rng.random() < 0.85:
            req[key] = rng.choice(pool)
    return req


def scenario(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    broken = rng.random() < 0.25
    now = rng.randrange(0, 10_000_000)
    requests = []
    for _ in range(rng.randrange(20, 120)):
        step = rng.choice([0, 1, 500, 1_999, 2_000, 30_000, 60_000, 600_000, 3_600_000, -5_000])
        now = max(0, now + step)
        requests.append([now, request(rng)])
    return {
        "lists": {name: {"kind": kind, "values": values} for name, (kind, values) in LISTS.items()},
        "rules": ruleset(rng, rng.randrange(1, 12), "g", broken),
        "merchant_rules": {"m1": ruleset(rng, rng.randrange(0, 5), "m", False)},
        "shadow_rules": ruleset(rng, rng.randrange(1, 8), "s", False) if rng.random() < 0.7 else None,
        "model_path": str(MODEL_PATH) if rng.random() < 0.7 else None,
        "requests": requests,
    }


def run_reference(s: dict[str, Any]) -> list[Any]:
    e = rr.Engine()
    for name, spec in s["lists"].items():
        lst = e.create_list(name, spec["kind"])
        for v in spec["values"]:
            lst.add(v)
    if s["model_path"]:
        e.load_model(Path(s["model_path"]).read_bytes())
    try:
        e.set_global_rules(e.compile_rules(s["rules"], 1))
    except rr.RulesError as err:
        return [{"compile_errors": [[x.line, x.column, x.kind] for x in err.errors]}]
    for m, src in s["merchant_rules"].items():
        e.set_merchant_rules(m, e.compile_rules(src, 2))
    if s["shadow_rules"] is not None:
        e.set_shadow_rules(e.compile_rules(s["shadow_rules"], 3))
    out: list[Any] = [e.decide(req, now) for now, req in s["requests"]]
    out.append(e.shadow_stats())
    return out


def run_rust(binary: Path, s: dict[str, Any]) -> list[Any]:
    proc = subprocess.run([str(binary)], input=json.dumps(s), capture_output=True, text=True, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def compare(binary: Path, seeds: range) -> int:
    failures = 0
    for seed in seeds:
        s = scenario(seed)
        expected, actual = run_reference(s), run_rust(binary, s)
        if expected != actual:
            failures += 1
            for i, (a, b) in enumerate(zip(expected, actual, strict=False)):
                if a != b:
                    print(f"seed {seed}: item {i} differs\n  python: {a}\n  rust:   {b}")
                    if i < len(s["requests"]):
                        print(f"  request: {s['requests'][i]}")
                    break
            else:
                print(f"seed {seed}: {len(expected)} python items, {len(actual)} rust items")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    failures = compare(args.bin, range(args.first_seed, args.first_seed + args.seeds))
    print(f"{args.seeds - failures}/{args.seeds} scenarios identical")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
