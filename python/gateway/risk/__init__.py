"""Risk engine support on the Python side: model features, the training script and the shipped model.

The engine itself is the Rust crate `rust/risk` (called from the fast path); see `docs/risk.md`.
"""
