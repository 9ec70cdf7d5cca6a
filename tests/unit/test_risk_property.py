"""Property tests: the Rust engine (standalone `RiskEngine`, through the Python binding) and the
plain-Python reference (`tests/reference/risk_ref.py`) decide identically on random rulesets and
random payment streams: action, deciding rule, matched rules, decline code, score, versions, shadow."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))

import compare_with_rust as gen
import risk_ref as rr
from gateway._fastpath import RiskEngine, RulesError

MODEL = gen.MODEL_PATH.read_bytes()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _optional(pool: list[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), st.sampled_from(pool))


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    req: dict[str, Any] = {
        "merchant_id": draw(st.sampled_from(["m1", "m2"])),
        "amount": draw(st.one_of(st.sampled_from([0, 100, 999, 5_000, 60_000, 750_000]),
                                 st.integers(0, 10**8))),
        "currency": draw(st.sampled_from(gen.CURRENCIES)),
    }
    if draw(st.booleans()) and draw(st.booleans()):
        req["amount_usd"] = draw(st.sampled_from([1.5, 99.99, 6000.0, 0.0]))
    for key, pool in (("card", gen.CARDS), ("email", gen.EMAILS), ("ip", gen.IPS), ("ip_country", gen.COUNTRIES),
                      ("device_id", gen.DEVICES), ("customer_id", gen.CUSTOMERS),
                      ("customer_country", gen.COUNTRIES)):
        value = draw(_optional(pool))
        if value is not None:
            req[key] = value
    return req


# Time steps that cross the velocity buckets' edges (2 s, 1 min, 30 min) and go backwards.
STEPS = st.sampled_from([0, 1, 500, 1_999, 2_000, 30_000, 59_999, 60_000, 600_000, 3_600_000, -5_000])


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    rng: random.Random = draw(st.randoms(use_true_random=False))
    now = draw(st.integers(0, 10_000_000))
    stream = []
    for step, req in draw(st.lists(st.tuples(STEPS, requests()), min_size=1, max_size=40)):
        now = max(0, now + step)
        stream.append((now, req))
    return {
        "rules": gen.ruleset(rng, rng.randrange(1, 10), "g", draw(st.booleans()) and rng.random() < 0.3),
        "merchant_rules": gen.ruleset(rng, rng.randrange(0, 4), "m", False) if draw(st.booleans()) else None,
        "shadow_rules": gen.ruleset(rng, rng.randrange(1, 6), "s", False) if draw(st.booleans()) else None,
        "model": draw(st.booleans()),
        "requests": stream,
    }


def _engines(s: dict[str, Any]) -> tuple[RiskEngine, rr.Engine]:
    rust, ref = RiskEngine(), rr.Engine()
    for name, (kind, values) in gen.LISTS.items():
        rust.create_list(name, kind)
        rust.list_add(name, values)
        lst = ref.create_list(name, kind)
        for v in values:
            lst.add(v)
    if s["model"]:
        assert rust.load_model(MODEL) == ref.load_model(MODEL)
    return rust, ref


@SETTINGS
@given(scenarios())
def test_rust_engine_and_reference_decide_identically(s: dict[str, Any]) -> None:
    rust, ref = _engines(s)
    try:
        ref_rules = ref.compile_rules(s["rules"], 7)
    except rr.RulesError as err:
        expected = [(e.line, e.column, e.kind) for e in err.errors]
        try:
            rust.set_rules(s["rules"], 7)
        except RulesError as rerr:
            assert [(ln, col, kind) for ln, col, kind, _ in rerr.args[1]] == expected
            assert rust.rules_version() == 0  # a refused ruleset changes nothing
            return
        raise AssertionError(f"Rust accepted a ruleset the reference refuses: {expected}") from None
    rust.set_rules(s["rules"], 7)
    ref.set_global_rules(ref_rules)
    if s["merchant_rules"] is not None:
        rust.set_merchant_rules("m1", s["merchant_rules"], 8)
        ref.set_merchant_rules("m1", ref.compile_rules(s["merchant_rules"], 8))
    if s["shadow_rules"] is not None:
        rust.set_shadow_rules(s["shadow_rules"], 9)
        ref.set_shadow_rules(ref.compile_rules(s["shadow_rules"], 9))
    for now, req in s["requests"]:
        body = json.dumps(req)
        # simulate answers without recording: it must agree too, and leave velocity untouched.
        assert json.loads(rust.simulate_json(body, now)) == ref.simulate(req, now), req
        got, want = json.loads(rust.decide_json(body, now)), ref.decide(req, now)
        assert got == want, (req, now)
    stats = json.loads(rust.shadow_stats_json())
    want_stats = ref.shadow_stats()
    for key in ("shadow_ruleset_version", "evaluated", "differences", "by_actions"):
        assert stats[key] == want_stats[key], key


@SETTINGS
@given(st.lists(requests(), min_size=1, max_size=12), st.integers(1, 6))
def test_velocity_threshold_blocks_from_the_first_payment_above_it(reqs: list[dict[str, Any]], limit: int) -> None:
    """`block if :card_count_1h: > N` passes payments 1..N of a card within the hour and blocks the rest,
    in both engines."""
    rust, ref = _engines({"model": False})
    src = f"burst: block if :card_count_1h: > {limit}\n"
    rust.set_rules(src, 1)
    ref.set_global_rules(ref.compile_rules(src, 1))
    seen: dict[str, int] = {}
    for i, req in enumerate(reqs):
        req = {**req, "card": req.get("card") or "tok_visa"}
        now = 1_000_000 + i * 1_000
        got = json.loads(rust.decide_json(json.dumps(req), now))
        assert got == ref.decide(req, now)
        seen[req["card"]] = seen.get(req["card"], 0) + 1
        assert got["action"] == ("block" if seen[req["card"]] > limit else "allow")
        if got["action"] == "block":
            assert got["decline_code"] == "velocity_exceeded" and got["rule"] == "burst"
