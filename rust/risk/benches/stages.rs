//! Micro benchmark of the risk engine: ns per decision and per stage (velocity, model, lists, rules).
//!
//! `cargo bench -p risk --bench stages` (release profile). No external harness: a fixed number of
//! iterations over a realistic mix (shipped model, ~10 global rules, a merchant ruleset, a shadow ruleset,
//! lists of 100k cards and 10k domains, pools of cards, e-mails, IPs and devices).

use std::hint::black_box;
use std::time::Instant;

use risk::{Context, Engine, ListKind, RiskInput, StageTimings};

const RULES: &str = "\
block if :amount_usd: > 5000 and :card_country: != :ip_country:
review if :cards_per_device_1h: > 3
disposable: block if :email: in @disposable_domains
block if :card: in @blocked_cards
challenge if :risk_score: >= 75
allow if :customer_id: in @vip
block if :card_count_1h: > 20
review if :ip_count_1m: > 30 or :email_count_24h: > 50
challenge if :card_ip_country_mismatch: = 1 and :amount_usd: > 1000
review if :card_bin: = '555555' and :ip_country: in @high_risk_countries
";

fn main() {
    let iterations: usize = std::env::var("RISK_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let engine = Engine::default();
    let lists = engine.lists();
    lists
        .create("disposable_domains", ListKind::Email, None)
        .unwrap();
    lists.create("blocked_cards", ListKind::Card, None).unwrap();
    lists.create("vip", ListKind::String, None).unwrap();
    lists
        .create("high_risk_countries", ListKind::Country, None)
        .unwrap();
    for i in 0..10_000 {
        lists
            .add("disposable_domains", &format!("disposable{i}.com"))
            .unwrap();
    }
    for i in 0..100_000 {
        lists
            .add("blocked_cards", &format!("tok_stolen{i}"))
            .unwrap();
    }
    lists.add("vip", "cus_vip").unwrap();
    lists.add("high_risk_countries", "NG").unwrap();
    let model = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../python/gateway/risk/model.json"
    ))
    .unwrap();
    engine.load_model(&model).unwrap();
    engine.set_global_rules(engine.compile_rules(RULES, 1).unwrap());
    engine
        .set_merchant_rules(
            "m1",
            Some(
                engine
                    .compile_rules("allow if :customer_id: = 'cus_trusted'", 1)
                    .unwrap(),
            ),
        )
        .unwrap();
    engine.set_shadow_rules(Some(
        engine
            .compile_rules(&RULES.replace("> 3", "> 2"), 2)
            .unwrap(),
    ));

    // 5,000 customers, each with a stable card, e-mail and device; IPs shared by a few customers. One
    // payment in 64 is card testing: a fixed device and IP trying a fresh card each time.
    let customers_n = 5_000;
    let cards: Vec<String> = (0..customers_n)
        .map(|i| format!("tok_visa_{}{i}", ["us", "gb", "de"][i % 3]))
        .collect();
    let testing_cards: Vec<String> = (0..4096).map(|i| format!("tok_test{i}")).collect();
    let emails: Vec<String> = (0..customers_n)
        .map(|i| format!("user{i}@example.com"))
        .collect();
    let ips: Vec<String> = (0..2_000)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    let devices: Vec<String> = (0..customers_n).map(|i| format!("dev{i}")).collect();
    let customers: Vec<String> = (0..customers_n).map(|i| format!("cus_{i}")).collect();
    let input = |i: usize| {
        let k = (i.wrapping_mul(2_654_435_761)) % customers_n;
        let testing = i % 64 == 0;
        RiskInput {
            merchant_id: if i % 2 == 0 { "m1" } else { "m2" },
            amount: 1_000 + (i as i64 % 50) * 997,
            currency: "USD",
            amount_usd: None,
            card: Some(if testing {
                &testing_cards[(i / 64) % 4096]
            } else {
                &cards[k]
            }),
            email: Some(&emails[k]),
            ip: Some(if testing {
                "203.0.113.7"
            } else {
                &ips[k % ips.len()]
            }),
            ip_country: Some("US"),
            device_id: Some(if testing { "dev_tester" } else { &devices[k] }),
            customer_id: Some(&customers[k]),
            customer_country: Some("US"),
        }
    };
    // 1 ms of simulated time per payment.
    let now = |i: usize| 1_700_000_000_000u64 + i as u64;

    // Warm up the counters and caches.
    for i in 0..20_000 {
        black_box(engine.decide(&input(i), now(i)));
    }

    let start = Instant::now();
    for i in 0..iterations {
        black_box(engine.decide(&input(i), now(i)));
    }
    let decide_ns = start.elapsed().as_nanos() as f64 / iterations as f64;

    let mut sum = StageTimings::default();
    for i in 0..iterations {
        let mut t = StageTimings::default();
        black_box(engine.decide_timed(&input(i), now(i), &mut t));
        sum.velocity_ns += t.velocity_ns;
        sum.model_ns += t.model_ns;
        sum.lists_ns += t.lists_ns;
        sum.rules_ns += t.rules_ns;
    }
    let per = |x: u64| x as f64 / iterations as f64;

    // Stages called on their own.
    let rules = engine.global_rules();
    let model = engine.model().unwrap();
    let inputs: Vec<RiskInput<'_>> = (0..4096).map(input).collect();
    let start = Instant::now();
    for i in 0..iterations {
        let ctx = Context::new(&inputs[i % 4096]);
        black_box(engine.features(&ctx, now(i + 2 * iterations + 20_000), true));
    }
    let velocity_alone = start.elapsed().as_nanos() as f64 / iterations as f64;
    let ctx0 = Context::new(&inputs[0]);
    let features = engine.features(&ctx0, now(0), false);
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(model.score(black_box(&features)));
    }
    let model_alone = start.elapsed().as_nanos() as f64 / iterations as f64;
    let start = Instant::now();
    for i in 0..iterations {
        let ctx = Context::new(&inputs[i % 4096]);
        black_box(rules.probe_lists(&ctx));
    }
    let lists_alone = start.elapsed().as_nanos() as f64 / iterations as f64;
    let hits = rules.probe_lists(&ctx0);
    let start = Instant::now();
    for _ in 0..iterations {
        let mut n = 0;
        rules.evaluate(&ctx0, black_box(&features), &hits, |_| n += 1);
        black_box(n);
    }
    let rules_alone = start.elapsed().as_nanos() as f64 / iterations as f64;

    println!(
        "risk engine, {iterations} iterations, model {} trees",
        model.trees()
    );
    println!("decide (end to end, untimed)   {decide_ns:8.0} ns/op");
    println!("decide_timed stages: velocity  {:8.0} ns  model {:6.0} ns  lists {:6.0} ns  rules {:6.0} ns",
        per(sum.velocity_ns), per(sum.model_ns), per(sum.lists_ns), per(sum.rules_ns));
    println!("stage alone: velocity (record) {velocity_alone:8.0} ns/op");
    println!("stage alone: model score       {model_alone:8.0} ns/op");
    println!(
        "stage alone: list probes       {lists_alone:8.0} ns/op ({} probes)",
        rules.probes.len()
    );
    println!(
        "stage alone: rule evaluation   {rules_alone:8.0} ns/op ({} rules)",
        rules.rules.len()
    );
    let s = engine.shadow_stats();
    println!(
        "shadow: {} evaluated, {} differences",
        s.evaluated, s.differences
    );
}
