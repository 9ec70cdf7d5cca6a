use super::*;
use crate::input::DeclineCode;
use crate::lists::ListKind;
use crate::model::tests::TWO_TREES;

fn engine() -> Engine {
    let e = Engine::default();
    e.lists()
        .create("blocked_cards", ListKind::Card, None)
        .unwrap();
    e.lists().create("vip", ListKind::String, None).unwrap();
    e.lists()
        .create("disposable_domains", ListKind::Email, None)
        .unwrap();
    e
}

fn install(e: &Engine, src: &str, version: u64) {
    let rs = e
        .compile_rules(src, version)
        .unwrap_or_else(|err| panic!("{err}"));
    e.set_global_rules(rs);
}

fn pay<'a>(merchant: &'a str, card: &'a str) -> RiskInput<'a> {
    RiskInput {
        merchant_id: merchant,
        amount: 1_000,
        currency: "USD",
        card: Some(card),
        email: Some("a@example.com"),
        ip: Some("10.0.0.1"),
        ip_country: Some("US"),
        customer_id: Some("cus_1"),
        ..Default::default()
    }
}

#[test]
fn engine_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<Ruleset>();
}

#[test]
fn default_is_allow_with_empty_trace() {
    let e = engine();
    let d = e.decide(&pay("m1", "tok_visa"), 0);
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.rule, None);
    assert!(d.matched_rules.is_empty());
    assert_eq!(
        (d.risk_score, d.model_hash.clone(), d.decline_code),
        (None, None, None)
    );
}

#[test]
fn within_a_ruleset_allow_beats_block_beats_challenge_beats_review() {
    let e = engine();
    e.lists().add("vip", "cus_1").unwrap();
    install(&e, "r: review if :amount: > 0\nc: challenge if :amount: > 0\nb: block if :amount: > 0\na: allow if :customer_id: in @vip", 7);
    let d = e.decide(&pay("m1", "tok_visa"), 0);
    assert_eq!((d.action, d.rule.as_deref()), (Action::Allow, Some("a")));
    assert_eq!(d.matched_rules.len(), 4);
    assert_eq!(d.ruleset_version, 7);
    e.lists().remove("vip", "cus_1").unwrap();
    let d = e.decide(&pay("m1", "tok_visa"), 0);
    assert_eq!(
        (d.action, d.rule.as_deref(), d.decline_code),
        (Action::Block, Some("b"), Some(DeclineCode::Fraudulent))
    );
}

#[test]
fn merchant_allow_cannot_override_global_block_but_overrides_global_review() {
    let e = engine();
    install(
        &e,
        "gb: block if :card: = 'tok_stolen'\ngr: review if :amount_usd: > 5",
        1,
    );
    let m = e
        .compile_rules(
            "ma: allow if :customer_id: = 'cus_1'\nmb: block if :card: = 'tok_visa_fr'",
            3,
        )
        .unwrap();
    e.set_merchant_rules("m1", Some(m)).unwrap();

    let d = e.decide(&pay("m1", "tok_stolen"), 0);
    assert_eq!((d.action, d.rule.as_deref()), (Action::Block, Some("gb")));
    assert_eq!(d.merchant_ruleset_version, Some(3));

    let d = e.decide(&pay("m1", "tok_visa"), 0);
    assert_eq!((d.action, d.rule.as_deref()), (Action::Allow, Some("ma")));
    let names: Vec<_> = d
        .matched_rules
        .iter()
        .map(|m| (&*m.name, m.scope))
        .collect();
    assert_eq!(names, [("gr", Scope::Global), ("ma", Scope::Merchant)]);

    // Another merchant gets only the global rules.
    let d = e.decide(&pay("m2", "tok_visa"), 0);
    assert_eq!(
        (d.action, d.merchant_ruleset_version),
        (Action::Review, None)
    );

    // A merchant block beats a global review.
    let mut p = pay("m1", "tok_visa_fr");
    p.customer_id = Some("cus_2");
    let d = e.decide(&p, 0);
    assert_eq!((d.action, d.rule.as_deref()), (Action::Block, Some("mb")));

    e.set_merchant_rules("m1", None).unwrap();
    assert_eq!(e.decide(&pay("m1", "tok_visa"), 0).action, Action::Review);
}

#[test]
fn velocity_rule_blocks_the_fourth_payment_and_blocked_payments_count() {
    let e = engine();
    install(&e, "block if :card_count_1h: > 3", 1);
    let p = pay("m1", "tok_visa");
    let actions: Vec<_> = (0..6).map(|i| e.decide(&p, i * 1000).action).collect();
    use Action::*;
    assert_eq!(actions, [Allow, Allow, Allow, Block, Block, Block]);
    let d = e.decide(&p, 6000);
    assert_eq!(d.decline_code, Some(DeclineCode::VelocityExceeded));
    // All 7 attempts leave the 1 h window (60 s buckets) once an hour has passed since the bucket start.
    assert_eq!(e.decide(&p, 3_600_000).action, Allow);
}

#[test]
fn simulate_does_not_record() {
    let e = engine();
    install(&e, "block if :card_count_1h: > 1", 1);
    let p = pay("m1", "tok_visa");
    for _ in 0..5 {
        assert_eq!(e.simulate(&p, 0).action, Action::Allow);
    }
    assert_eq!(e.decide(&p, 0).action, Action::Allow);
    assert_eq!(e.decide(&p, 0).action, Action::Block);
}

#[test]
fn list_updates_apply_without_recompiling() {
    let e = engine();
    install(
        &e,
        "block if :card: in @blocked_cards\nblock if :email: in @disposable_domains",
        1,
    );
    let p = pay("m1", "tok_visa");
    assert_eq!(e.decide(&p, 0).action, Action::Allow);
    e.lists().add("blocked_cards", "tok_visa").unwrap();
    let d = e.decide(&p, 0);
    assert_eq!(
        (d.action, d.decline_code),
        (Action::Block, Some(DeclineCode::Blocklisted))
    );
    e.lists().remove("blocked_cards", "tok_visa").unwrap();
    assert_eq!(e.decide(&p, 0).action, Action::Allow);
    e.lists().add("disposable_domains", "example.com").unwrap();
    assert_eq!(e.decide(&p, 0).rule.as_deref(), Some("rule_2"));
}

#[test]
fn model_score_feeds_rules_and_trace() {
    let e = engine();
    let hash = e.load_model(TWO_TREES.as_bytes()).unwrap();
    install(
        &e,
        "challenge if :risk_score: >= 90\nblock if :risk_score: >= 99",
        1,
    );
    // 600 USD: tree 1 gives 1.5; card_count_1h = 1 < 3 then amount >= 50 gives 0.25: margin 1.75.
    let mut p = pay("m1", "tok_visa");
    p.amount = 60_000;
    let d = e.decide(&p, 0);
    let expected = (100.0 / (1.0 + (-1.75f64).exp()) + 0.5).floor() as u8;
    assert_eq!(d.risk_score, Some(expected));
    assert_eq!(d.model_hash.as_deref(), Some(hash.as_str()));
    assert_eq!(d.action, Action::Allow, "score {expected}");
    // Three more payments on the card: count reaches 4 >= 3, tree 2 gives 2.0: margin 3.5 -> 97.
    for t in 1..3 {
        e.decide(&p, t);
    }
    let d = e.decide(&p, 3);
    assert_eq!(d.risk_score, Some(97));
    assert_eq!(d.action, Action::Challenge);
    e.set_model(None);
    assert_eq!(e.decide(&p, 4).risk_score, None);
}

#[test]
fn highest_risk_level_decline_code() {
    let e = engine();
    e.load_model(TWO_TREES.as_bytes()).unwrap();
    install(&e, "block if :risk_score: > 0", 1);
    assert_eq!(
        e.decide(&pay("m1", "tok_visa"), 0).decline_code,
        Some(DeclineCode::HighestRiskLevel)
    );
}

#[test]
fn shadow_ruleset_is_counted_and_samples_are_bounded() {
    let e = Engine::new(EngineConfig {
        shadow_samples_max: 3,
        ..Default::default()
    });
    install(&e, "block if :amount_usd: > 100", 1);
    e.set_shadow_rules(Some(
        e.compile_rules("block if :amount_usd: > 50", 2).unwrap(),
    ));
    let mut p = pay("m1", "tok_visa");
    for (i, amount) in [1_000, 7_500, 8_000, 20_000, 6_000, 7_000]
        .into_iter()
        .enumerate()
    {
        p.amount = amount;
        let d = e.decide(&p, i as u64);
        assert_eq!(d.shadow_ruleset_version, Some(2));
        let expected_shadow = if amount > 5_000 {
            Action::Block
        } else {
            Action::Allow
        };
        assert_eq!(d.shadow_action, Some(expected_shadow));
    }
    let s = e.shadow_stats();
    assert_eq!((s.evaluated, s.differences), (6, 4));
    assert!(s.by_actions.contains(&(Action::Allow, Action::Block, 4)));
    assert!(s.by_actions.contains(&(Action::Block, Action::Block, 1)));
    assert_eq!(s.samples.len(), 3);
    assert_eq!(
        s.samples.iter().map(|x| x.now_ms).collect::<Vec<_>>(),
        [2, 4, 5]
    );
    assert_eq!(s.samples[0].shadow_rule.as_deref(), Some("rule_1"));
    // simulate() does not count; replacing the shadow resets.
    e.simulate(&p, 9);
    assert_eq!(e.shadow_stats().evaluated, 6);
    e.set_shadow_rules(None);
    let s = e.shadow_stats();
    assert_eq!((s.evaluated, s.shadow_ruleset_version), (0, None));
    assert_eq!(e.decide(&p, 10).shadow_action, None);
}

#[test]
fn concurrent_decisions_never_see_half_a_ruleset() {
    let e = Arc::new(engine());
    install(&e, "v0: review if :amount: > 0", 0);
    std::thread::scope(|s| {
        for t in 0..3 {
            let e = e.clone();
            s.spawn(move || {
                let card = format!("tok_t{t}");
                for i in 0..2_000u64 {
                    let d = e.decide(&pay("m1", &card), i);
                    // Every rule of version N is named vN: the trace must be internally consistent.
                    let v = d.ruleset_version;
                    assert!(
                        d.matched_rules.iter().all(|m| *m.name == *format!("v{v}")),
                        "{d:?}"
                    );
                    assert_eq!(d.matched_rules.len(), 1);
                }
            });
        }
        for v in 1..200u64 {
            install(
                &e,
                &format!("v{v}: review if :amount: > 0\nv{v}_b: allow if :amount: < 0"),
                v,
            );
        }
    });
}

#[test]
fn decide_json_round_trip_and_timings() {
    let e = engine();
    install(&e, "block if :card_country: != :ip_country:", 4);
    let out = e
        .decide_json(r#"{"merchant_id":"m1","amount":1000,"currency":"USD","card":"tok_visa_gb","ip_country":"US"}"#, 0)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["action"], "block");
    assert_eq!(v["decline_code"], "fraudulent");
    assert_eq!(v["rule"], "rule_1");
    assert_eq!(v["ruleset_version"], 4);
    assert_eq!(v["matched_rules"][0]["scope"], "global");
    assert!(e.decide_json(r#"{"merchant_id":"m1"}"#, 0).is_err());
    let mut t = StageTimings::default();
    let d = e.decide_timed(&pay("m1", "tok_visa"), 0, &mut t);
    assert_eq!(d.action, Action::Allow);
    assert!(t.velocity_ns > 0 || t.rules_ns > 0);
}

#[test]
fn shared_velocity_replaces_the_local_store() {
    use crate::attrs::{velocity_index, DIM_CARD, VELOCITY_BASE};
    use crate::shared_velocity::{SharedFeatures, VELOCITY_FEATURES};
    let e = engine();
    install(&e, "block if :card_count_1h: > 3", 1);
    let p = pay("m1", "tok_visa");
    let mut raw = vec![-1i64; VELOCITY_FEATURES];
    let card_1h = velocity_index(DIM_CARD, 1) - VELOCITY_BASE;
    let mut t = StageTimings::default();
    raw[card_1h] = 4;
    let shared = SharedFeatures::from_counters(&raw).unwrap();
    let d = e.decide_shared(&p, 0, &shared, &mut t);
    assert_eq!(
        (d.action, d.decline_code),
        (Action::Block, Some(DeclineCode::VelocityExceeded))
    );
    raw[card_1h] = 3;
    let shared = SharedFeatures::from_counters(&raw).unwrap();
    for _ in 0..5 {
        assert_eq!(
            e.decide_shared(&p, 0, &shared, &mut t).action,
            Action::Allow
        );
    }
    // The local store saw none of those payments.
    assert_eq!(e.velocity().keys(), [0; 6]);
    assert_eq!(e.decide(&p, 0).action, Action::Allow);
}
