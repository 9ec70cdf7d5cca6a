//! Runs a JSON scenario through the engine and prints one decision per line (JSON), for comparing the
//! engine with the Python reference (`tests/reference/compare_with_rust.py`).
//!
//! Scenario on stdin: `{"lists": {"name": {"kind": "email", "values": [..]}}, "rules": "...",
//! "merchant_rules": {"m1": "..."}, "shadow_rules": "..." | null, "model_path": "..." | null,
//! "requests": [[now_ms, {RiskRequest}], ...]}`.

use std::io::Read;

use risk::{Engine, ListKind, RiskRequest};
use serde::Deserialize;

#[derive(Deserialize)]
struct ListSpec {
    kind: String,
    values: Vec<String>,
}

#[derive(Deserialize)]
struct Scenario {
    lists: std::collections::BTreeMap<String, ListSpec>,
    rules: String,
    #[serde(default)]
    merchant_rules: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    shadow_rules: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
    requests: Vec<(u64, RiskRequest)>,
}

fn main() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    let s: Scenario = serde_json::from_str(&input).expect("scenario JSON");
    let e = Engine::default();
    for (name, spec) in &s.lists {
        let kind = ListKind::parse(&spec.kind).expect("list kind");
        e.lists().create(name, kind, None).expect("create list");
        for v in &spec.values {
            e.lists().add(name, v).expect("add to list");
        }
    }
    if let Some(path) = &s.model_path {
        e.load_model(&std::fs::read(path).expect("model file"))
            .expect("model");
    }
    match e.compile_rules(&s.rules, 1) {
        Ok(rs) => {
            e.set_global_rules(rs);
        }
        Err(err) => {
            let errors: Vec<_> = err
                .errors
                .iter()
                .map(|e| (e.line, e.column, e.kind))
                .collect();
            println!("{}", serde_json::json!({ "compile_errors": errors }));
            return;
        }
    }
    for (m, src) in &s.merchant_rules {
        e.set_merchant_rules(m, Some(e.compile_rules(src, 2).expect("merchant rules")))
            .expect("install");
    }
    if let Some(src) = &s.shadow_rules {
        e.set_shadow_rules(Some(e.compile_rules(src, 3).expect("shadow rules")));
    }
    for (now_ms, req) in &s.requests {
        println!(
            "{}",
            serde_json::to_string(&e.decide(&req.as_input(), *now_ms)).expect("json")
        );
    }
    println!(
        "{}",
        serde_json::to_string(&e.shadow_stats()).expect("json")
    );
}
