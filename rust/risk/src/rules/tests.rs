use super::*;
use crate::attrs::{velocity_index, AMOUNT_USD, DIM_CARD, RISK_SCORE};
use crate::input::RiskInput;
use crate::lists::ListKind;

fn lists() -> Lists {
    let lists = Lists::default();
    lists
        .create("disposable_domains", ListKind::Email, None)
        .unwrap();
    lists.create("vip", ListKind::String, None).unwrap();
    lists.create("blocked_ips", ListKind::Ip, None).unwrap();
    lists.add("disposable_domains", "mailinator.com").unwrap();
    lists.add("vip", "cus_vip").unwrap();
    lists
}

fn compile(src: &str) -> Ruleset {
    Ruleset::compile(src, 1, &lists()).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(src: &str) -> Vec<RuleError> {
    Ruleset::compile(src, 1, &lists()).unwrap_err().errors
}

fn input() -> RiskInput<'static> {
    RiskInput {
        merchant_id: "m1",
        amount: 600_000,
        currency: "USD",
        card: Some("tok_visa_gb"),
        email: Some("x@mailinator.com"),
        ip: Some("10.0.0.1"),
        ip_country: Some("us"),
        customer_id: Some("cus_vip"),
        ..Default::default()
    }
}

fn matches(rs: &Ruleset, i: &RiskInput<'_>, f: &Features) -> Vec<String> {
    let ctx = Context::new(i);
    let hits = rs.probe_lists(&ctx);
    let mut out = Vec::new();
    rs.evaluate(&ctx, f, &hits, |r| out.push(r.name.to_string()));
    out
}

fn features(i: &RiskInput<'_>) -> Features {
    Features::from_context(&Context::new(i))
}

#[test]
fn compiles_the_documented_examples() {
    let rs = compile(
        "# fraud team rules\n\
         block if :amount_usd: > 5000 and :card_country: != :ip_country:\n\
         review if :cards_per_device_1h: > 3   # trailing comment\n\
         \n\
         disposable: block if :email: in @disposable_domains\n\
         challenge if :risk_score: >= 75\n\
         allow if :customer_id: in @vip\n",
    );
    let names: Vec<_> = rs.rules.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(
        names,
        ["rule_2", "rule_3", "disposable", "rule_6", "rule_7"]
    );
    assert_eq!(rs.rules[0].decline_code, DeclineCode::Fraudulent);
    assert_eq!(rs.rules[1].decline_code, DeclineCode::VelocityExceeded);
    assert_eq!(rs.rules[2].decline_code, DeclineCode::Blocklisted);
    assert_eq!(rs.rules[3].decline_code, DeclineCode::HighestRiskLevel);
    assert_eq!(rs.probes.len(), 2);
    assert_eq!(rs.version, 1);
}

#[test]
fn evaluates_comparisons_lists_and_attribute_pairs() {
    let rs = compile(
        "a: block if :amount_usd: > 5000 and :card_country: != :ip_country:\n\
         b: block if :email: in @disposable_domains\n\
         c: allow if :customer_id: in @vip\n\
         d: review if :ip: not in @blocked_ips\n\
         e: review if :card_bin: = '424242' and :card_brand: = \"VISA\"\n\
         f: review if 5000 < :amount_usd:\n\
         g: review if :currency: = 'eur'\n",
    );
    let i = input();
    assert_eq!(
        matches(&rs, &i, &features(&i)),
        ["a", "b", "c", "d", "e", "f"]
    );
    let mut j = input();
    j.card = Some("tok_visa_us");
    j.customer_id = None;
    j.email = Some("x@example.com");
    j.currency = "EUR";
    assert_eq!(matches(&rs, &j, &features(&j)), ["d", "e", "f", "g"]);
}

#[test]
fn missing_values_make_comparisons_false_and_not_in_true() {
    let rs = compile(
        "a: block if :ip_country: != 'US'\n\
         b: block if :card_count_1h: != 3\n\
         c: block if :device_id: not in @vip\n\
         d: block if not (:device_id: = 'x')\n\
         e: block if :card_country: != :customer_country:\n",
    );
    let i = RiskInput {
        merchant_id: "m",
        amount: 1,
        currency: "USD",
        ..Default::default()
    };
    assert_eq!(matches(&rs, &i, &features(&i)), ["c", "d"]);
    let empty = RiskInput {
        ip_country: Some(""),
        ..i
    };
    assert_eq!(matches(&rs, &empty, &features(&empty)), ["c", "d"]);
}

#[test]
fn and_binds_tighter_than_or_and_parentheses_group() {
    let rs = compile(
        "a: block if :amount: > 1 or :amount: > 100 and :amount: < 0\n\
         b: block if (:amount: > 1 or :amount: > 100) and :amount: < 0\n\
         c: block if not :amount: < 0 and not (:amount: > 10 or :amount: = 5)\n",
    );
    let i = RiskInput {
        merchant_id: "m",
        amount: 5,
        currency: "USD",
        ..Default::default()
    };
    assert_eq!(matches(&rs, &i, &features(&i)), ["a"]);
    let j = RiskInput { amount: 7, ..i };
    assert_eq!(matches(&rs, &j, &features(&j)), ["a", "c"]);
}

#[test]
fn numeric_features_drive_rules_and_threshold_is_exact() {
    let rs = compile("v: block if :card_count_1h: > 3\ns: challenge if :risk_score: >= 75");
    let i = input();
    let mut f = features(&i);
    f.values[velocity_index(DIM_CARD, 1)] = 3.0;
    f.values[RISK_SCORE] = 74.0;
    assert!(matches(&rs, &i, &f).is_empty());
    f.values[velocity_index(DIM_CARD, 1)] = 4.0;
    f.values[RISK_SCORE] = 75.0;
    assert_eq!(matches(&rs, &i, &f), ["v", "s"]);
    assert!(f.values[AMOUNT_USD] == 6000.0);
}

#[test]
fn ruleset_decide_uses_action_priority_then_source_order() {
    let rs = compile(
        "r1: review if :amount: > 0\n\
         c1: challenge if :amount: > 0\n\
         b1: block if :amount: > 0\n\
         b2: block if :amount: > 0\n\
         a1: allow if :customer_id: = 'nobody'\n",
    );
    let i = input();
    let ctx = Context::new(&i);
    let f = features(&i);
    let best = rs.decide(&ctx, &f, &rs.probe_lists(&ctx)).unwrap();
    assert_eq!(&*best.name, "b1");
}

#[test]
fn unknown_attribute_is_reported_with_line_and_column() {
    let e = errors("block if :amount: > 1\nreview if :card_count_2h: > 3");
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0].line, e[0].column, e[0].kind),
        (2, 11, RuleErrorKind::UnknownAttribute)
    );
    assert_eq!(
        e[0].to_string(),
        "line 2, column 11: unknown attribute :card_count_2h:"
    );
}

#[test]
fn unknown_list_is_reported() {
    let e = errors("block if :email: in @nope");
    assert_eq!(
        (e[0].line, e[0].column, e[0].kind),
        (1, 21, RuleErrorKind::UnknownList)
    );
    assert!(e[0].message.contains("@nope"));
}

#[test]
fn type_mismatches_are_reported() {
    let cases = [
        ("block if :amount_usd: > 'US'", 23),
        ("block if :card_country: > 'US'", 25),
        ("block if :card_country: = 5", 25),
        ("block if :ip: in @disposable_domains", 15),
        ("block if :amount: in @vip", 10),
        ("block if 'a' = 'b'", 14),
        ("block if :amount: = :email:", 19),
    ];
    for (src, column) in cases {
        let e = errors(src);
        assert_eq!(
            (e[0].column, e[0].kind),
            (column, RuleErrorKind::TypeMismatch),
            "{src}: {}",
            e[0]
        );
    }
}

#[test]
fn syntax_errors_say_what_was_expected() {
    let cases = [
        ("block :amount: > 1", 7, "expected 'if'"),
        ("deny if :amount: > 1", 1, "expected an action"),
        (
            "block if :amount: > 1 :amount:",
            23,
            "expected 'and', 'or' or end of line",
        ),
        ("block if (:amount: > 1", 23, "expected ')'"),
        ("block if :amount: >", 20, "found end of line"),
        ("block if :email: = 'x", 20, "unterminated string"),
        ("block if :amount: ~ 1", 19, "unexpected character"),
        ("block if :email: not @vip", 22, "expected 'in'"),
    ];
    for (src, column, msg) in cases {
        let e = errors(src);
        assert_eq!(
            (e[0].column, e[0].kind),
            (column, RuleErrorKind::Syntax),
            "{src}: {}",
            e[0]
        );
        assert!(e[0].message.contains(msg), "{src}: {}", e[0]);
    }
}

#[test]
fn every_bad_line_is_reported_and_names_are_unique() {
    let e = errors(
        "x: block if :amount: > 1\nx: review if :amount: > 2\nblock if :nope: > 1\nblock if",
    );
    let lines: Vec<_> = e.iter().map(|e| (e.line, e.kind)).collect();
    assert_eq!(
        lines,
        [
            (2, RuleErrorKind::DuplicateName),
            (3, RuleErrorKind::UnknownAttribute),
            (4, RuleErrorKind::Syntax)
        ]
    );
}

#[test]
fn hash_inside_string_is_not_a_comment() {
    let rs = compile("block if :customer_id: = 'a#b' # comment");
    let i = RiskInput {
        merchant_id: "m",
        customer_id: Some("a#b"),
        currency: "USD",
        ..Default::default()
    };
    assert_eq!(matches(&rs, &i, &features(&i)), ["rule_1"]);
}
