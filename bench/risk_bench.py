"""Cost of the risk decision: the Rust engine through its Python binding vs the plain-Python reference.

1. Per stage, inside the fast path: `FastPath.create_payment` calls with a production-like ruleset
   (lists, velocity rules, model score), read back from the engine's own stage histograms
   (`gateway_fastpath_stage_seconds{stage="risk_velocity|risk_model|risk_lists|risk_rules"}`): mean ns.
2. The whole decision through one Python call: `RiskEngine.decide_json` (JSON in, JSON out) and
   `simulate_json`, median and P99 ns, beside `risk_ref.Engine.decide` (dict in, dict out) on the
   same requests, and the ratio reference / Rust.
3. Incremental cost of each stage through the Python call: decide_json with nothing installed, then
   + model, + list rules, + velocity rules, + the full ruleset.

Prints a table and saves JSON under bench/results/ (git-ignored).

    python bench/risk_bench.py [--n 20000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "reference"))

import risk_ref as rr
from gateway._fastpath import FastPath, RiskEngine

MODEL = (REPO / "python" / "gateway" / "risk" / "model.json").read_bytes()
LISTS = {
    "stolen_cards": ("card", [f"tok_stolen{i}" for i in range(10_000)]),
    "disposable": ("email", ["mailinator.com", "guerrillamail.com", "10minutemail.com"]),
    "vip": ("string", ["cus_vip"]),
    "risky_countries": ("country", ["KP", "IR"]),
}
LIST_RULES = (
    "vip: allow if :customer_id: in @vip\n"
    "stolen: block if :card: in @stolen_cards\n"
    "disposable: review if :email: in @disposable\n"
    "sanctioned: block if :ip_country: in @risky_countries\n"
)
VELOCITY_RULES = (
    "card_burst: block if :card_count_1h: > 20\n"
    "device_cards: review if :cards_per_device_1h: > 5\n"
    "card_spend: review if :card_amount_usd_24h: > 20000\n"
    "ip_burst: challenge if :ip_count_1m: > 30\n"
)
FULL_RULES = LIST_RULES + VELOCITY_RULES + (
    "mismatch: review if :amount_usd: > 2000 and :card_ip_country: != :ip_country:\n"
    "score: challenge if :risk_score: >= 80\n"
)
FULL_RULES = FULL_RULES.replace(":card_ip_country:", ":card_country:")


def requests(n: int) -> list[tuple[int, dict[str, Any]]]:
    out = []
    now = 1_700_000_000_000
    for i in range(n):
        now += 3
        req: dict[str, Any] = {
            "merchant_id": f"acct_{i % 8}",
            "amount": 500 + (i * 7919) % 300_000,
            "currency": ("USD", "EUR", "GBP")[i % 3],
            "card": f"tok_visa_{('us', 'gb', 'de')[i % 3]}" if i % 5 else f"tok_c{i % 997}",
            "email": f"user{i % 1500}@{'mailinator.com' if i % 50 == 0 else 'example.com'}",
            "ip": f"198.51.100.{i % 250}",
            "ip_country": "GB",
            "device_id": f"dev{i % 700}",
            "customer_id": f"cus_{i % 1200}",
            "customer_country": "GB",
        }
        out.append((now, req))
    return out


def setup(engine: Any, *, model: bool, lists: bool, rules: str) -> None:
    if lists:
        for name, (kind, values) in LISTS.items():
            if isinstance(engine, RiskEngine):
                engine.create_list(name, kind)
                engine.list_add(name, values)
            else:
                lst = engine.create_list(name, kind)
                for v in values:
                    lst.add(v)
    if model:
        engine.load_model(MODEL)
    if isinstance(engine, RiskEngine):
        engine.set_rules(rules, 1)
    else:
        engine.set_global_rules(engine.compile_rules(rules, 1))


def timed(fn: Callable[[int, Any], Any], items: list[tuple[int, Any]]) -> dict[str, float]:
    samples = []
    for now, x in items:
        t0 = time.perf_counter_ns()
        fn(x, now)
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return {"median_ns": float(statistics.median(samples)), "p99_ns": float(samples[int(len(samples) * 0.99)]),
            "mean_ns": statistics.fmean(samples)}


def fastpath_stages(n: int) -> dict[str, float]:
    """Mean ns per risk stage inside `FastPath.create_payment`, from the engine's own histograms."""
    with tempfile.TemporaryDirectory() as tmp:
        fp = FastPath(json.dumps({"wal_dir": str(Path(tmp) / "wal"), "fsync_interval_us": 1000,
                                  "rate_limit_per_s": 1e9, "rate_limit_burst": 1e9}))
        try:
            setup(fp.risk, model=True, lists=True, rules=FULL_RULES)
            bodies = []
            for _, req in requests(n):
                body = {"amount": max(1, req["amount"]), "currency": req["currency"], "payment_method": req["card"],
                        "customer": {"email": req["email"], "ip": req["ip"], "device_id": req["device_id"],
                                     "id": req["customer_id"], "country": req["customer_country"]}}
                bodies.append((req["merchant_id"], json.dumps(body).encode()))
            # A first pass touches every velocity key's memory (first-touch page faults); the second is measured.
            for merchant, body in bodies:
                fp.create_payment(merchant, None, body)
            before = _stage_sums(fp.metrics_text())
            for merchant, body in bodies:
                fp.create_payment(merchant, None, body)
            after = _stage_sums(fp.metrics_text())
        finally:
            fp.close()
    return {s: (after[s][0] - before[s][0]) / (after[s][1] - before[s][1]) * 1e9
            for s in after if after[s][1] > before[s][1]}


def _stage_sums(text: str) -> dict[str, tuple[float, float]]:
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for kind, stage, value in re.findall(
            r'gateway_fastpath_stage_seconds_(sum|count)\{stage="(risk_[a-z]+)"\} (\S+)', text):
        (sums if kind == "sum" else counts)[stage] = float(value)
    return {s: (sums[s], counts.get(s, 0.0)) for s in sums}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args()
    n = args.n
    results: dict[str, Any] = {"n": n, "when": dt.datetime.now(dt.UTC).isoformat()}

    stages = fastpath_stages(n)
    results["fastpath_stage_mean_ns"] = stages

    reqs = requests(n)
    jreqs = [(now, json.dumps(r)) for now, r in reqs]
    rust = RiskEngine(keys_per_dimension_max=65_536)
    setup(rust, model=True, lists=True, rules=FULL_RULES)
    ref = rr.Engine()
    setup(ref, model=True, lists=True, rules=FULL_RULES)
    timed(rust.simulate_json, jreqs)  # warm-up: code, caches, allocator (simulate records nothing)
    decide = timed(rust.decide_json, jreqs)
    # The reference is ~100x slower: a fifth of the requests is enough for stable figures.
    ref_n = max(1000, n // 5)
    reference = timed(ref.decide, reqs[:ref_n])
    simulate = timed(rust.simulate_json, jreqs)
    results["decide_json"] = decide
    results["simulate_json"] = simulate
    results["reference_decide"] = reference
    results["reference_requests"] = ref_n
    results["ratio_reference_over_rust_median"] = reference["median_ns"] / decide["median_ns"]

    ladder = [("nothing installed", False, False, ""), ("+ model", True, False, ""),
              ("+ list rules", True, True, LIST_RULES), ("+ velocity rules", True, True, LIST_RULES + VELOCITY_RULES),
              ("full ruleset", True, True, FULL_RULES)]
    results["ladder_decide_json_median_ns"] = {}
    for name, model, lists, rules in ladder:
        e = RiskEngine(keys_per_dimension_max=65_536)
        setup(e, model=model, lists=lists, rules=rules)
        results["ladder_decide_json_median_ns"][name] = timed(e.decide_json, jreqs)["median_ns"]

    print(f"risk decision, {n} requests (P99 of single calls includes timer and Python overhead)")
    print("  inside FastPath.create_payment, mean ns per stage (engine histograms):")
    for s in ("risk_velocity", "risk_model", "risk_lists", "risk_rules"):
        print(f"    {s:<14} {stages.get(s, float('nan')):>10.0f}")
    print("  through one Python call:")
    print(f"    RiskEngine.decide_json    median {decide['median_ns']:>9.0f} ns   p99 {decide['p99_ns']:>9.0f} ns")
    print(f"    RiskEngine.simulate_json  median {simulate['median_ns']:>9.0f} ns   p99 {simulate['p99_ns']:>9.0f} ns")
    print(f"    risk_ref.Engine.decide    median {reference['median_ns']:>9.0f} ns   p99 {reference['p99_ns']:>9.0f} ns")
    print(f"    ratio reference / Rust (median): {results['ratio_reference_over_rust_median']:.1f}x")
    print("  decide_json median as stages are added:")
    for name, v in results["ladder_decide_json_median_ns"].items():
        print(f"    {name:<18} {v:>9.0f} ns")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"risk_bench_{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"saved {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
