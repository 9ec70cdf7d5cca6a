//! Evaluation of an XGBoost `binary:logistic` model saved with `save_model("model.json")`.
//!
//! Trees are flattened into one node array. A node goes left when its feature value, rounded to `f32`
//! like XGBoost does, is `< split_condition`; a missing (NaN) value follows `default_left`. A leaf's value
//! is its `split_conditions` entry (XGBoost stores the learning-rate-scaled leaf weight there). The margin
//! is `logit(base_score) + sum(leaves)` summed in `f64` in tree order, the probability its sigmoid, and
//! `risk_score = floor(100 * p + 0.5)`.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::attrs::{Features, MODEL_FEATURES};
use crate::error::ModelError;

pub const TREES_MAX: usize = 2_000;
pub const NODES_MAX: usize = 2_000_000;
pub const MODEL_BYTES_MAX: usize = 64 << 20;
const LEAF: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct RawNode {
    /// Split threshold, or the leaf value for a leaf.
    value: f32,
    feature: u32,
    left: u32,
    right: u32,
    default_left: bool,
}

/// A flattened node (12 bytes). Siblings are adjacent: the right child is `left + 1`.
#[derive(Debug, Clone, Copy)]
struct Node {
    /// Split threshold, or the leaf value for a leaf.
    value: f32,
    /// Bits 0-30: feature index (`FEATURE_LEAF` for a leaf); bit 31: missing values go left.
    meta: u32,
    left: u32,
}

const FEATURE_MASK: u32 = 0x7fff_ffff;
const FEATURE_LEAF: u32 = FEATURE_MASK;
const DEFAULT_LEFT: u32 = 1 << 31;
/// Trees walked together by `margin`.
const LANES: usize = 8;

/// Appends one tree to `nodes` in breadth-first order with siblings adjacent.
fn lay_out(tree: &[RawNode], nodes: &mut Vec<Node>) -> Result<(), String> {
    let base = nodes.len() as u32;
    let mut order = vec![0usize];
    let mut new_index = vec![u32::MAX; tree.len()];
    new_index[0] = 0;
    let mut k = 0;
    while k < order.len() {
        let raw = &tree[order[k]];
        if raw.feature != LEAF {
            for child in [raw.left as usize, raw.right as usize] {
                if new_index[child] != u32::MAX {
                    return Err(format!("node {child} has two parents"));
                }
                new_index[child] = order.len() as u32;
                order.push(child);
            }
        }
        k += 1;
    }
    for &old in &order {
        let raw = &tree[old];
        nodes.push(if raw.feature == LEAF {
            Node {
                value: raw.value,
                meta: FEATURE_LEAF,
                left: 0,
            }
        } else {
            Node {
                value: raw.value,
                meta: raw.feature | if raw.default_left { DEFAULT_LEFT } else { 0 },
                left: base + new_index[raw.left as usize],
            }
        });
    }
    Ok(())
}

/// A loaded model, immutable and shareable between threads.
#[derive(Debug, Clone)]
pub struct Model {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    base_margin: f64,
    sha256_hex: String,
}

fn field<'v>(v: &'v Value, path: &[&'static str]) -> Result<&'v Value, ModelError> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key).ok_or(ModelError::Missing(key))?;
    }
    Ok(cur)
}

/// Parses numbers XGBoost writes as strings, including the `"[5E-1]"` vector form of newer versions.
fn number_in_string(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim()
            .parse()
            .ok(),
        _ => None,
    }
}

fn array<'v>(tree: &'v Value, key: &'static str, len: usize) -> Result<&'v Vec<Value>, ModelError> {
    let a = tree
        .get(key)
        .and_then(Value::as_array)
        .ok_or(ModelError::Missing(key))?;
    if a.len() != len {
        return Err(ModelError::Invalid(format!(
            "{key} has {} entries, expected {len}",
            a.len()
        )));
    }
    Ok(a)
}

impl Model {
    /// Parses the JSON bytes of a model file.
    pub fn from_json(bytes: &[u8]) -> Result<Model, ModelError> {
        if bytes.len() > MODEL_BYTES_MAX {
            return Err(ModelError::TooLarge(format!(
                "{} bytes, at most {MODEL_BYTES_MAX}",
                bytes.len()
            )));
        }
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| ModelError::Json(e.to_string()))?;
        let learner = field(&doc, &["learner"])?;
        let objective = field(learner, &["objective", "name"])?
            .as_str()
            .unwrap_or("");
        if objective != "binary:logistic" {
            return Err(ModelError::Unsupported(format!(
                "objective {objective:?}, expected binary:logistic"
            )));
        }
        let params = field(learner, &["learner_model_param"])?;
        let base_score = number_in_string(field(params, &["base_score"])?)
            .ok_or(ModelError::Invalid("base_score is not a number".into()))?;
        if !(base_score > 0.0 && base_score < 1.0) {
            return Err(ModelError::Invalid(format!(
                "base_score {base_score} outside (0, 1)"
            )));
        }
        if let Some(n) = params.get("num_feature").and_then(number_in_string) {
            if n as usize > MODEL_FEATURES.len() {
                return Err(ModelError::Invalid(format!(
                    "model expects {n} features, the engine provides {}",
                    MODEL_FEATURES.len()
                )));
            }
        }
        let booster = field(learner, &["gradient_booster"])?;
        let name = booster
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("gbtree");
        if name != "gbtree" {
            return Err(ModelError::Unsupported(format!(
                "booster {name:?}, expected gbtree"
            )));
        }
        let trees = field(booster, &["model", "trees"])?
            .as_array()
            .ok_or(ModelError::Missing("trees"))?;
        if trees.len() > TREES_MAX {
            return Err(ModelError::TooLarge(format!(
                "{} trees, at most {TREES_MAX}",
                trees.len()
            )));
        }
        let mut nodes = Vec::new();
        let mut roots = Vec::with_capacity(trees.len());
        for (t, tree) in trees.iter().enumerate() {
            let bad = |what: String| ModelError::Invalid(format!("tree {t}: {what}"));
            let left = tree
                .get("left_children")
                .and_then(Value::as_array)
                .ok_or(ModelError::Missing("left_children"))?;
            let n = left.len();
            if n == 0 {
                return Err(bad("no nodes".into()));
            }
            if nodes.len() + n > NODES_MAX {
                return Err(ModelError::TooLarge(format!("more than {NODES_MAX} nodes")));
            }
            let right = array(tree, "right_children", n)?;
            let index = array(tree, "split_indices", n)?;
            let cond = array(tree, "split_conditions", n)?;
            let default_left = array(tree, "default_left", n)?;
            if let Some(types) = tree.get("split_type").and_then(Value::as_array) {
                if types.iter().any(|v| v.as_i64().unwrap_or(0) != 0) {
                    return Err(ModelError::Unsupported(format!(
                        "tree {t}: categorical splits"
                    )));
                }
            }
            roots.push(nodes.len() as u32);
            let mut tree_nodes = Vec::with_capacity(n);
            for i in 0..n {
                let l = left[i]
                    .as_i64()
                    .ok_or_else(|| bad(format!("left_children[{i}]")))?;
                let r = right[i]
                    .as_i64()
                    .ok_or_else(|| bad(format!("right_children[{i}]")))?;
                let value = cond[i]
                    .as_f64()
                    .ok_or_else(|| bad(format!("split_conditions[{i}]")))?
                    as f32;
                let dl = match &default_left[i] {
                    Value::Bool(b) => *b,
                    v => {
                        v.as_i64()
                            .ok_or_else(|| bad(format!("default_left[{i}]")))?
                            != 0
                    }
                };
                let node = if l == -1 {
                    RawNode {
                        value,
                        feature: LEAF,
                        left: 0,
                        right: 0,
                        default_left: false,
                    }
                } else {
                    // Children always follow their parent in XGBoost's numbering; requiring it here
                    // guarantees every walk terminates.
                    let ok = |c: i64| c > i as i64 && (c as usize) < n;
                    if !ok(l) || !ok(r) {
                        return Err(bad(format!("node {i} has invalid children {l}, {r}")));
                    }
                    let feature = index[i]
                        .as_u64()
                        .ok_or_else(|| bad(format!("split_indices[{i}]")))?;
                    if feature as usize >= MODEL_FEATURES.len() {
                        return Err(bad(format!(
                            "node {i} splits on feature {feature}, the engine provides {}",
                            MODEL_FEATURES.len()
                        )));
                    }
                    RawNode {
                        value,
                        feature: feature as u32,
                        left: l as u32,
                        right: r as u32,
                        default_left: dl,
                    }
                };
                tree_nodes.push(node);
            }
            lay_out(&tree_nodes, &mut nodes).map_err(bad)?;
        }
        let sha256_hex = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Model {
            nodes,
            roots,
            base_margin: (base_score / (1.0 - base_score)).ln(),
            sha256_hex,
        })
    }

    /// The model's input vector in `MODEL_FEATURES` order (NaN = missing).
    #[inline]
    pub fn feature_vector(features: &Features) -> [f64; MODEL_FEATURES.len()] {
        MODEL_FEATURES.map(|i| features.values[i])
    }

    /// Raw margin (log-odds) for one feature vector.
    #[inline]
    pub fn margin(&self, x: &[f64; MODEL_FEATURES.len()]) -> f64 {
        let xf: [f32; MODEL_FEATURES.len()] = x.map(|v| v as f32);
        let step = |node: Node| -> u32 {
            let v = xf[(node.meta & FEATURE_MASK) as usize];
            let go_left = if v.is_nan() {
                node.meta & DEFAULT_LEFT != 0
            } else {
                v < node.value
            };
            node.left + (!go_left) as u32
        };
        let mut sum = self.base_margin;
        // Walk LANES trees at once: each walk is a chain of dependent loads, and interleaving independent
        // chains lets the CPU overlap them. Leaves are summed in tree order, as the reference does.
        let mut chunks = self.roots.chunks_exact(LANES);
        for chunk in &mut chunks {
            let mut at: [u32; LANES] = [0; LANES];
            at.copy_from_slice(chunk);
            loop {
                let mut active = false;
                for slot in at.iter_mut() {
                    let node = self.nodes[*slot as usize];
                    if node.meta & FEATURE_MASK != FEATURE_LEAF {
                        active = true;
                        *slot = step(node);
                    }
                }
                if !active {
                    break;
                }
            }
            for slot in at {
                sum += self.nodes[slot as usize].value as f64;
            }
        }
        for &root in chunks.remainder() {
            let mut node = self.nodes[root as usize];
            while node.meta & FEATURE_MASK != FEATURE_LEAF {
                node = self.nodes[step(node) as usize];
            }
            sum += node.value as f64;
        }
        sum
    }

    pub fn probability(&self, x: &[f64; MODEL_FEATURES.len()]) -> f64 {
        1.0 / (1.0 + (-self.margin(x)).exp())
    }

    /// `risk_score` in 0..=100.
    #[inline]
    pub fn score(&self, features: &Features) -> u8 {
        let p = self.probability(&Model::feature_vector(features));
        (100.0 * p + 0.5).floor().clamp(0.0, 100.0) as u8
    }

    pub fn sha256_hex(&self) -> &str {
        &self.sha256_hex
    }

    /// First 12 hex digits of the SHA-256 of the file, as reported in decisions.
    pub fn short_hash(&self) -> &str {
        &self.sha256_hex[..12]
    }

    pub fn trees(&self) -> usize {
        self.roots.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two hand-written trees over feature 0 (amount_usd) and feature 3 (card_count_1h).
    pub(crate) const TWO_TREES: &str = r#"{
      "learner": {
        "learner_model_param": {"base_score": "5E-1", "num_feature": "15"},
        "objective": {"name": "binary:logistic"},
        "gradient_booster": {"name": "gbtree", "model": {"trees": [
          {"left_children": [1, -1, -1], "right_children": [2, -1, -1], "split_indices": [0, 0, 0],
           "split_conditions": [100.0, -1.0, 1.5], "default_left": [1, 0, 0], "base_weights": [0, -1.0, 1.5]},
          {"left_children": [1, 3, -1, -1, -1], "right_children": [2, 4, -1, -1, -1],
           "split_indices": [3, 0, 0, 0, 0], "split_conditions": [3.0, 50.0, 2.0, -0.5, 0.25],
           "default_left": [false, true, false, false, false], "base_weights": [0, 0, 2.0, -0.5, 0.25]}
        ]}}
      }
    }"#;

    fn x(amount_usd: f64, card_count_1h: f64) -> [f64; 15] {
        let mut v = [f64::NAN; 15];
        v[0] = amount_usd;
        v[3] = card_count_1h;
        v
    }

    #[test]
    fn margin_equals_hand_computed_trees() {
        let m = Model::from_json(TWO_TREES.as_bytes()).unwrap();
        assert_eq!(m.trees(), 2);
        // amount 20 (< 100: -1.0); count 1 (< 3) then amount 20 (< 50): -0.5. base 0.5 -> margin 0.
        assert_eq!(m.margin(&x(20.0, 1.0)), -1.5);
        // amount 500 (>= 100: 1.5); count 5 (>= 3): 2.0.
        assert_eq!(m.margin(&x(500.0, 5.0)), 3.5);
        // count 1 then amount 60 (>= 50): 0.25.
        assert_eq!(m.margin(&x(60.0, 1.0)), -0.75);
        let p = m.probability(&x(500.0, 5.0));
        assert!((p - 1.0 / (1.0 + (-3.5f64).exp())).abs() < 1e-12);
    }

    #[test]
    fn missing_values_follow_default_left() {
        let m = Model::from_json(TWO_TREES.as_bytes()).unwrap();
        // amount missing: tree 1 default left (-1.0); count missing: default right (2.0).
        assert_eq!(m.margin(&[f64::NAN; 15]), 1.0);
        let mut f = Features::default();
        f.values[crate::attrs::AMOUNT_USD] = 500.0;
        f.values[crate::attrs::velocity_index(0, 1)] = 5.0;
        assert_eq!(
            m.score(&f),
            (100.0 / (1.0 + (-3.5f64).exp()) + 0.5).floor() as u8
        );
    }

    #[test]
    fn hash_is_sha256_of_file_bytes() {
        let m = Model::from_json(TWO_TREES.as_bytes()).unwrap();
        assert_eq!(m.sha256_hex().len(), 64);
        assert_eq!(m.short_hash(), &m.sha256_hex()[..12]);
    }

    #[test]
    fn rejects_bad_models_with_clear_errors() {
        assert!(matches!(Model::from_json(b"{"), Err(ModelError::Json(_))));
        let wrong_obj = TWO_TREES.replace("binary:logistic", "reg:squarederror");
        assert!(matches!(
            Model::from_json(wrong_obj.as_bytes()),
            Err(ModelError::Unsupported(_))
        ));
        let cyclic = TWO_TREES.replace("[1, -1, -1]", "[0, -1, -1]");
        assert!(matches!(
            Model::from_json(cyclic.as_bytes()),
            Err(ModelError::Invalid(_))
        ));
        let bad_feature = TWO_TREES.replace("\"split_indices\": [3,", "\"split_indices\": [99,");
        assert!(matches!(
            Model::from_json(bad_feature.as_bytes()),
            Err(ModelError::Invalid(_))
        ));
        let vector_base = TWO_TREES.replace("\"5E-1\"", "\"[5E-1]\"");
        assert!(Model::from_json(vector_base.as_bytes()).is_ok());
    }

    #[test]
    fn shipped_model_matches_xgboost_predictions() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let bytes = std::fs::read(root.join("python/gateway/risk/model.json")).unwrap();
        let m = Model::from_json(&bytes).unwrap();
        let doc: Value = serde_json::from_slice(&bytes).unwrap();
        let names: Vec<&str> = doc["learner"]["feature_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(names, crate::attrs::model_feature_names());
        let vectors: Value = serde_json::from_slice(
            &std::fs::read(root.join("tests/reference/model_vectors.json")).unwrap(),
        )
        .unwrap();
        let cases = vectors["cases"].as_array().unwrap();
        assert!(cases.len() > 100);
        for case in cases {
            let mut x = [f64::NAN; MODEL_FEATURES.len()];
            for (slot, v) in x.iter_mut().zip(case["x"].as_array().unwrap()) {
                *slot = v.as_f64().unwrap_or(f64::NAN);
            }
            let expected = case["p"].as_f64().unwrap();
            let p = m.probability(&x);
            assert!(
                (p - expected).abs() < 1e-5,
                "{x:?}: {p} vs xgboost {expected}"
            );
        }
    }
}
