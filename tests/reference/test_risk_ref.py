"""Unit tests of the plain-Python risk reference (`risk_ref.py`), mirroring the Rust crate's tests."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import risk_ref as rr
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = ROOT / "python" / "gateway" / "risk" / "model.json"
VECTORS_PATH = Path(__file__).with_name("model_vectors.json")

TWO_TREES = json.dumps(
    {
        "learner": {
            "learner_model_param": {"base_score": "5E-1", "num_feature": "15"},
            "objective": {"name": "binary:logistic"},
            "gradient_booster": {
                "name": "gbtree",
                "model": {
                    "trees": [
                        {
                            "left_children": [1, -1, -1],
                            "right_children": [2, -1, -1],
                            "split_indices": [0, 0, 0],
                            "split_conditions": [100.0, -1.0, 1.5],
                            "default_left": [1, 0, 0],
                            "base_weights": [0, -1.0, 1.5],
                        },
                        {
                            "left_children": [1, 3, -1, -1, -1],
                            "right_children": [2, 4, -1, -1, -1],
                            "split_indices": [3, 0, 0, 0, 0],
                            "split_conditions": [3.0, 50.0, 2.0, -0.5, 0.25],
                            "default_left": [False, True, False, False, False],
                            "base_weights": [0, 0, 2.0, -0.5, 0.25],
                        },
                    ]
                },
            },
        }
    }
).encode()


def pay(merchant: str = "m1", card: str = "tok_visa", **extra: object) -> dict[str, object]:
    req: dict[str, object] = {
        "merchant_id": merchant,
        "amount": 1_000,
        "currency": "USD",
        "card": card,
        "email": "a@example.com",
        "ip": "10.0.0.1",
        "ip_country": "US",
        "customer_id": "cus_1",
    }
    req.update(extra)
    return req


def engine() -> rr.Engine:
    e = rr.Engine()
    e.create_list("blocked_cards", "card")
    e.create_list("vip", "string")
    e.create_list("disposable_domains", "email")
    return e


def install(e: rr.Engine, src: str, version: int = 1) -> None:
    e.set_global_rules(e.compile_rules(src, version))


# -- card tokens, features -------------------------------------------------------------------------


def test_card_attributes_follow_the_token_convention() -> None:
    assert rr.card_attributes("tok_visa") == ("424242", "US", "visa")
    assert rr.card_attributes("tok_mastercard_de") == ("555555", "DE", "mastercard")
    assert rr.card_attributes("tok_bin_411111_fr") == ("411111", "FR", "visa")
    assert rr.card_attributes("tok_whatever_it") == (None, "IT", "unknown")
    assert rr.card_attributes("pm_123") == (None, None, None)
    assert rr.card_attributes("tok_abc_toolong") == (None, None, "unknown")


def test_model_feature_order_is_shared_with_the_training_script() -> None:
    shared = runpy.run_path(str(ROOT / "python" / "gateway" / "risk" / "features.py"))
    assert tuple(shared["MODEL_FEATURE_NAMES"]) == rr.MODEL_FEATURE_NAMES
    assert all(name in rr.NUMERIC_SET for name in rr.MODEL_FEATURE_NAMES)
    assert json.loads(MODEL_PATH.read_bytes())["learner"]["feature_names"] == list(rr.MODEL_FEATURE_NAMES)


def test_attribute_names_are_systematic() -> None:
    assert len(rr.NUMERIC) == 59
    for name in ("card_count_1h", "card_amount_usd_24h", "merchant_count_1m", "cards_per_device_1h"):
        assert name in rr.NUMERIC_SET


# -- lists -----------------------------------------------------------------------------------------


def test_email_list_matches_addresses_domains_and_parent_domains() -> None:
    lst = rr.RefList("disposable_domains", "email")
    lst.add("Mailinator.com")
    lst.add("fraudster@example.org")
    assert lst.contains("email", "x@mailinator.com")
    assert lst.contains("email", "X@MAILINATOR.COM")
    assert lst.contains("email", "x@eu.mailinator.com")
    assert not lst.contains("email", "x@notmailinator.com")
    assert lst.contains("email", "Fraudster@Example.org")
    assert not lst.contains("email", "other@example.org")
    assert lst.contains("email_domain", "mailinator.com")
    assert not lst.contains("email", "x@com")


def test_list_limits_raise_clear_errors() -> None:
    lst = rr.RefList("small", "string", entries_max=2)
    assert lst.add("a") and lst.add("b") and not lst.add("a")
    with pytest.raises(rr.ListError, match="full: at most 2 entries"):
        lst.add("c")
    with pytest.raises(rr.ListError, match="too long"):
        lst.add("x" * 257)
    assert lst.remove("a") and not lst.remove("a")


# -- velocity --------------------------------------------------------------------------------------


def observe(store: rr.VelocityStore, req: dict[str, object], now_ms: int, record: bool = True) -> rr.Features:
    ctx = rr.Context.of(req)
    f = rr.stateless_features(ctx)
    store.observe(ctx, now_ms, record, f)
    return f


def test_count_includes_current_payment_and_sums_amounts() -> None:
    store = rr.VelocityStore()
    for n in range(1, 5):
        f = observe(store, pay(), 1_000 * n)
        assert f["card_count_1h"] == n
        assert f["card_amount_usd_1h"] == 10.0 * n
        assert f["merchant_count_1m"] == n
    assert observe(store, pay(card=""), 0)["card_count_1m"] is None


def test_one_minute_window_expires_exactly_at_its_length_for_bucket_aligned_events() -> None:
    store = rr.VelocityStore()
    observe(store, pay(card="tok_a"), 0)
    assert observe(store, pay(card="tok_b"), 59_999)["ip_count_1m"] == 2
    assert observe(store, pay(card="tok_b"), 60_000)["ip_count_1m"] == 2
    f = observe(store, pay(card="tok_b"), 60_000)
    assert (f["ip_count_1m"], f["ip_count_1h"]) == (3, 4)


def test_unaligned_event_expires_with_its_bucket_and_peek_records_nothing() -> None:
    store = rr.VelocityStore()
    observe(store, pay(card="tok_a"), 1_999)
    assert observe(store, pay(card="tok_a"), 59_999, record=False)["card_count_1m"] == 2
    assert observe(store, pay(card="tok_a"), 60_000, record=False)["card_count_1m"] == 1
    assert observe(store, pay(card="tok_a"), 1_999, record=False)["card_count_1m"] == 2


def test_late_events_go_to_the_newest_bucket() -> None:
    store = rr.VelocityStore()
    observe(store, pay(), 10_000_000)
    assert observe(store, pay(), 9_000_000)["card_count_24h"] == 2
    assert observe(store, pay(), 10_000_000 + 86_400_000)["card_count_24h"] == 1


def test_distinct_cards_per_device_by_window_and_saturation() -> None:
    store = rr.VelocityStore()
    observe(store, pay(card="tok_1", device_id="dev"), 0)
    observe(store, pay(card="tok_2", device_id="dev"), 1_000)
    assert observe(store, pay(card="tok_1", device_id="dev"), 2_000)["cards_per_device_1m"] == 2
    f = observe(store, pay(card="tok_3", device_id="dev"), 61_000)
    assert (f["cards_per_device_1m"], f["cards_per_device_1h"]) == (2, 3)
    for i in range(100):
        observe(store, pay(card=f"tok_x{i}", device_id="dev"), 100_000 + i)
    assert observe(store, pay(card="tok_x99", device_id="dev"), 100_200)["cards_per_device_1h"] == 64


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=200_000), min_size=1, max_size=40),
    st.integers(min_value=0, max_value=300_000),
)
def test_ring_counts_match_the_bucket_definition(times: list[int], query: int) -> None:
    """count = events whose bucket lies in the last `n` buckets up to max(now bucket, newest bucket)."""
    ms, n = 2_000, 30
    ring = rr.Ring(ms, n)
    newest = 0
    placed: list[int] = []
    for t in times:
        ring.add(t, 1)
        newest = max(newest, t // ms)
        placed.append(newest)  # late events land in the newest bucket
    ring.advance(query // ms)
    current = max(newest, query // ms)
    expected = sum(1 for b in placed if b > current - n)
    assert ring.count == expected == sum(ring.counts)


# -- rules -----------------------------------------------------------------------------------------


def rules_lists() -> dict[str, rr.RefList]:
    lists = {
        "disposable_domains": rr.RefList("disposable_domains", "email"),
        "vip": rr.RefList("vip", "string"),
        "blocked_ips": rr.RefList("blocked_ips", "ip"),
    }
    lists["disposable_domains"].add("mailinator.com")
    lists["vip"].add("cus_vip")
    return lists


def errors(src: str) -> list[rr.RuleError]:
    with pytest.raises(rr.RulesError) as exc:
        rr.compile_rules(src, 1, rules_lists())
    return exc.value.errors


def test_compiles_the_documented_examples() -> None:
    rs = rr.compile_rules(
        "# fraud team rules\n"
        "block if :amount_usd: > 5000 and :card_country: != :ip_country:\n"
        "review if :cards_per_device_1h: > 3   # trailing comment\n"
        "\n"
        "disposable: block if :email: in @disposable_domains\n"
        "challenge if :risk_score: >= 75\n"
        "allow if :customer_id: in @vip\n",
        1,
        rules_lists(),
    )
    assert [r.name for r in rs.rules] == ["rule_2", "rule_3", "disposable", "rule_6", "rule_7"]
    assert [r.decline_code for r in rs.rules[:4]] == [
        "fraudulent",
        "velocity_exceeded",
        "blocklisted",
        "highest_risk_level",
    ]
    assert len(rs.probes) == 2


def test_evaluates_comparisons_lists_and_attribute_pairs() -> None:
    rs = rr.compile_rules(
        "a: block if :amount_usd: > 5000 and :card_country: != :ip_country:\n"
        "b: block if :email: in @disposable_domains\n"
        "c: allow if :customer_id: in @vip\n"
        "d: review if :ip: not in @blocked_ips\n"
        "e: review if :card_bin: = '424242' and :card_brand: = \"VISA\"\n"
        "f: review if 5000 < :amount_usd:\n"
        "g: review if :currency: = 'eur'\n",
        1,
        rules_lists(),
    )
    req = pay(
        card="tok_visa_gb", amount=600_000, email="x@mailinator.com", ip_country="us", customer_id="cus_vip"
    )
    ctx = rr.Context.of(req)
    assert [r.name for r in rr.matching_rules(rs, ctx, rr.stateless_features(ctx))] == list("abcdef")


def test_missing_values_make_comparisons_false_and_not_in_true() -> None:
    rs = rr.compile_rules(
        "a: block if :ip_country: != 'US'\n"
        "b: block if :card_count_1h: != 3\n"
        "c: block if :device_id: not in @vip\n"
        "d: block if not (:device_id: = 'x')\n"
        "e: block if :card_country: != :customer_country:\n",
        1,
        rules_lists(),
    )
    ctx = rr.Context.of({"merchant_id": "m", "amount": 1, "currency": "USD", "ip_country": ""})
    assert [r.name for r in rr.matching_rules(rs, ctx, rr.stateless_features(ctx))] == ["c", "d"]


def test_and_binds_tighter_than_or() -> None:
    rs = rr.compile_rules(
        "a: block if :amount: > 1 or :amount: > 100 and :amount: < 0\n"
        "b: block if (:amount: > 1 or :amount: > 100) and :amount: < 0\n"
        "c: block if not :amount: < 0 and not (:amount: > 10 or :amount: = 5)\n",
        1,
        rules_lists(),
    )
    for amount, expected in ((5, ["a"]), (7, ["a", "c"])):
        ctx = rr.Context.of({"merchant_id": "m", "amount": amount, "currency": "USD"})
        assert [r.name for r in rr.matching_rules(rs, ctx, rr.stateless_features(ctx))] == expected


def test_unknown_attribute_is_reported_with_line_and_column() -> None:
    (e,) = errors("block if :amount: > 1\nreview if :card_count_2h: > 3")
    assert (e.line, e.column, e.kind) == (2, 11, "unknown_attribute")
    assert str(e) == "line 2, column 11: unknown attribute :card_count_2h:"


def test_unknown_list_is_reported() -> None:
    (e,) = errors("block if :email: in @nope")
    assert (e.line, e.column, e.kind) == (1, 21, "unknown_list")


@pytest.mark.parametrize(
    ("src", "column"),
    [
        ("block if :amount_usd: > 'US'", 23),
        ("block if :card_country: > 'US'", 25),
        ("block if :card_country: = 5", 25),
        ("block if :ip: in @disposable_domains", 15),
        ("block if :amount: in @vip", 10),
        ("block if 'a' = 'b'", 14),
        ("block if :amount: = :email:", 19),
    ],
)
def test_type_mismatches_are_reported(src: str, column: int) -> None:
    e = errors(src)[0]
    assert (e.column, e.kind) == (column, "type_mismatch")


@pytest.mark.parametrize(
    ("src", "column", "message"),
    [
        ("block :amount: > 1", 7, "expected 'if'"),
        ("deny if :amount: > 1", 1, "expected an action"),
        ("block if :amount: > 1 :amount:", 23, "expected 'and', 'or' or end of line"),
        ("block if (:amount: > 1", 23, "expected ')'"),
        ("block if :amount: >", 20, "found end of line"),
        ("block if :email: = 'x", 20, "unterminated string"),
        ("block if :amount: ~ 1", 19, "unexpected character"),
        ("block if :email: not @vip", 22, "expected 'in'"),
    ],
)
def test_syntax_errors_say_what_was_expected(src: str, column: int, message: str) -> None:
    e = errors(src)[0]
    assert (e.column, e.kind) == (column, "syntax")
    assert message in e.message


def test_every_bad_line_is_reported() -> None:
    errs = errors("x: block if :amount: > 1\nx: review if :amount: > 2\nblock if :nope: > 1\nblock if")
    assert [(e.line, e.kind) for e in errs] == [
        (2, "duplicate_name"),
        (3, "unknown_attribute"),
        (4, "syntax"),
    ]


# -- model -----------------------------------------------------------------------------------------


def x(amount_usd: float | None, card_count_1h: float | None) -> list[float | None]:
    v: list[float | None] = [None] * 15
    v[0], v[3] = amount_usd, card_count_1h
    return v


def test_model_margin_equals_hand_computed_trees_and_missing_goes_default() -> None:
    m = rr.Model(TWO_TREES)
    assert m.margin(x(20.0, 1.0)) == -1.5
    assert m.margin(x(500.0, 5.0)) == 3.5
    assert m.margin(x(60.0, 1.0)) == -0.75
    assert m.margin(x(None, None)) == 1.0
    assert len(m.short_hash) == 12


def test_shipped_model_matches_xgboost_predictions() -> None:
    m = rr.Model(MODEL_PATH.read_bytes())
    cases = json.loads(VECTORS_PATH.read_text())["cases"]
    assert len(cases) > 100
    for case in cases:
        assert math.isclose(m.probability(case["x"]), case["p"], abs_tol=1e-5)


# -- engine ----------------------------------------------------------------------------------------


def test_within_a_ruleset_allow_beats_block_beats_challenge_beats_review() -> None:
    e = engine()
    e.lists["vip"].add("cus_1")
    install(
        e,
        "r: review if :amount: > 0\nc: challenge if :amount: > 0\nb: block if :amount: > 0\n"
        "a: allow if :customer_id: in @vip",
        7,
    )
    d = e.decide(pay(), 0)
    assert (d["action"], d["rule"], len(d["matched_rules"]), d["ruleset_version"]) == ("allow", "a", 4, 7)
    e.lists["vip"].remove("cus_1")
    d = e.decide(pay(), 0)
    assert (d["action"], d["rule"], d["decline_code"]) == ("block", "b", "fraudulent")


def test_merchant_allow_cannot_override_global_block_but_overrides_global_review() -> None:
    e = engine()
    install(e, "gb: block if :card: = 'tok_stolen'\ngr: review if :amount_usd: > 5")
    e.set_merchant_rules(
        "m1", e.compile_rules("ma: allow if :customer_id: = 'cus_1'\nmb: block if :card: = 'tok_visa_fr'", 3)
    )
    d = e.decide(pay(card="tok_stolen"), 0)
    assert (d["action"], d["rule"], d["merchant_ruleset_version"]) == ("block", "gb", 3)
    d = e.decide(pay(), 0)
    assert (d["action"], d["rule"]) == ("allow", "ma")
    assert [(m["name"], m["scope"]) for m in d["matched_rules"]] == [("gr", "global"), ("ma", "merchant")]
    assert e.decide(pay("m2"), 0)["action"] == "review"
    d = e.decide(pay(card="tok_visa_fr", customer_id="cus_2"), 0)
    assert (d["action"], d["rule"]) == ("block", "mb")


def test_velocity_rule_blocks_the_fourth_payment_and_blocked_payments_count() -> None:
    e = engine()
    install(e, "block if :card_count_1h: > 3")
    actions = [e.decide(pay(), i * 1000)["action"] for i in range(6)]
    assert actions == ["allow"] * 3 + ["block"] * 3
    assert e.decide(pay(), 6000)["decline_code"] == "velocity_exceeded"
    assert e.decide(pay(), 3_600_000)["action"] == "allow"


def test_model_score_feeds_rules_and_trace() -> None:
    e = engine()
    h = e.load_model(TWO_TREES)
    install(e, "challenge if :risk_score: >= 90\nblock if :risk_score: >= 99")
    d = e.decide(pay(amount=60_000), 0)
    assert d["risk_score"] == math.floor(100 / (1 + math.exp(-1.75)) + 0.5)
    assert (d["action"], d["model_hash"]) == ("allow", h)
    for t in (1, 2):
        e.decide(pay(amount=60_000), t)
    d = e.decide(pay(amount=60_000), 3)
    assert (d["risk_score"], d["action"]) == (97, "challenge")


def test_shadow_ruleset_is_counted_and_samples_are_bounded() -> None:
    e = rr.Engine(shadow_samples_max=3)
    install(e, "block if :amount_usd: > 100")
    e.set_shadow_rules(e.compile_rules("block if :amount_usd: > 50", 2))
    for i, amount in enumerate([1_000, 7_500, 8_000, 20_000, 6_000, 7_000]):
        d = e.decide(pay(amount=amount), i)
        assert d["shadow_action"] == ("block" if amount > 5_000 else "allow")
    s = e.shadow_stats()
    assert (s["evaluated"], s["differences"]) == (6, 4)
    assert ["allow", "block", 4] in s["by_actions"]
    assert [x["now_ms"] for x in s["samples"]] == [2, 4, 5]
    e.simulate(pay(), 9)
    assert e.shadow_stats()["evaluated"] == 6


def test_decision_json_shape_matches_the_rust_decision() -> None:
    e = engine()
    install(e, "block if :card_country: != :ip_country:", 4)
    out = json.loads(
        e.decide_json(
            '{"merchant_id":"m1","amount":1000,"currency":"USD","card":"tok_visa_gb","ip_country":"US"}', 0
        )
    )
    assert out == {
        "action": "block",
        "risk_score": None,
        "decline_code": "fraudulent",
        "rule": "rule_1",
        "matched_rules": [{"name": "rule_1", "action": "block", "scope": "global"}],
        "ruleset_version": 4,
        "merchant_ruleset_version": None,
        "model_hash": None,
        "shadow_action": None,
        "shadow_ruleset_version": None,
    }
    with pytest.raises(ValueError, match="unknown request fields"):
        e.decide({"merchant_id": "m", "amount": 1, "currency": "USD", "pan": "4242"}, 0)


# -- differential check against the Rust engine ---------------------------------------------------


def _scenario_binary() -> Path | None:
    import os

    candidates = [os.environ.get("RISK_DECIDE_SCENARIO_BIN", "")]
    candidates += [str(ROOT / "target" / d / "examples" / "decide_scenario") for d in ("debug", "release")]
    candidates += [str(ROOT / "target" / "risk-dev" / "debug" / "examples" / "decide_scenario")]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def test_rust_engine_agrees_with_reference_on_random_scenarios() -> None:
    binary = _scenario_binary()
    if binary is None:
        pytest.skip("build it with: cargo build -p risk --example decide_scenario")
    import compare_with_rust

    assert compare_with_rust.compare(binary, range(50)) == 0
