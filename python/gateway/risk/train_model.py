"""Train the small fraud model shipped as `model.json` on synthetic payments.

Usage: python -m gateway.risk.train_model [--out PATH] [--seed N] [--rows N] [--trees N]

The data is synthetic: legitimate payments are small, local and slow; fraudulent ones are larger,
cross-border and fast (many payments per card, many cards per device). Features are exactly
`MODEL_FEATURE_NAMES`, in order; missing values (NaN) appear where the engine would have none (no
device id, no IP country). The output is XGBoost's own JSON format (`Booster.save_model`), which the Rust
engine (`rust/risk/src/model.rs`) and the Python reference evaluate. Requires `requirements/risk.txt`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import xgboost as xgb

from gateway.risk.features import MODEL_FEATURE_NAMES

DEFAULT_OUT = Path(__file__).with_name("model.json")


def synthetic_payments(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (rows x features, NaN = missing) and fraud labels."""
    rng = np.random.default_rng(seed)
    fraud = rng.random(rows) < 0.12
    n = rows

    def mix(legit: np.ndarray, bad: np.ndarray) -> np.ndarray:
        return np.where(fraud, bad, legit).astype(np.float64)

    amount = mix(rng.lognormal(3.4, 1.0, n), rng.lognormal(4.1, 1.3, n))
    ip_mismatch = mix(rng.random(n) < 0.05, rng.random(n) < 0.30)
    cust_mismatch = mix(rng.random(n) < 0.03, rng.random(n) < 0.25)
    card_1h = mix(1 + rng.poisson(0.2, n), 1 + rng.poisson(0.9, n))
    card_24h = card_1h + mix(rng.poisson(0.8, n), rng.poisson(2.0, n))
    card_amount_24h = np.round(amount * card_24h * rng.uniform(0.6, 1.4, n), 2)
    ip_1h = mix(1 + rng.poisson(0.4, n), 1 + rng.poisson(1.2, n))
    ip_24h = ip_1h + mix(rng.poisson(2.0, n), rng.poisson(4.0, n))
    email_24h = mix(1 + rng.poisson(0.7, n), 1 + rng.poisson(1.5, n))
    device_1h = mix(1 + rng.poisson(0.3, n), 1 + rng.poisson(0.8, n))
    cards_device = mix(1 + rng.binomial(2, 0.05, n), 1 + rng.poisson(1.0, n))
    cards_email = mix(1 + rng.binomial(2, 0.05, n), 1 + rng.poisson(0.6, n))
    cards_ip = mix(1 + rng.poisson(0.2, n), 1 + rng.poisson(1.0, n))
    customer_24h = mix(1 + rng.poisson(0.5, n), 1 + rng.poisson(1.5, n))
    emails_card = mix(1 + rng.binomial(1, 0.03, n), 1 + rng.poisson(0.5, n))
    x = np.column_stack(
        [
            np.round(amount, 2),
            ip_mismatch,
            cust_mismatch,
            card_1h,
            card_24h,
            card_amount_24h,
            ip_1h,
            ip_24h,
            email_24h,
            device_1h,
            cards_device,
            cards_email,
            cards_ip,
            customer_24h,
            emails_card,
        ]
    )
    assert x.shape[1] == len(MODEL_FEATURE_NAMES)
    # Absent inputs: no IP country (mismatch unknown), no device id (device features unknown).
    no_ip_country = rng.random(n) < 0.08
    x[no_ip_country, 1] = np.nan
    no_device = rng.random(n) < 0.15
    x[no_device, 9] = np.nan
    x[no_device, 10] = np.nan
    # Label noise: some fraud looks legitimate and the reverse, as in real chargeback data.
    flip = rng.random(n) < 0.03
    return x, (fraud ^ flip).astype(np.int32)


def train(rows: int, seed: int, trees: int) -> xgb.Booster:
    x, y = synthetic_payments(rows, seed)
    dtrain = xgb.DMatrix(x, label=y, feature_names=list(MODEL_FEATURE_NAMES), missing=np.nan)
    params = {
        "objective": "binary:logistic",
        "eval_metric": "auc",
        "max_depth": 4,
        "eta": 0.2,
        "subsample": 0.9,
        "seed": seed,
        "nthread": 1,
        "tree_method": "hist",
    }
    return xgb.train(params, dtrain, num_boost_round=trees)


def write_vectors(booster: xgb.Booster, path: Path, seed: int, rows: int = 200) -> None:
    """Feature vectors (null = missing) and XGBoost's probability for each: the cross-language fixture."""
    x, _ = synthetic_payments(rows, seed)
    p = booster.predict(xgb.DMatrix(x, feature_names=list(MODEL_FEATURE_NAMES), missing=np.nan))
    cases = [
        {"x": [None if np.isnan(v) else float(v) for v in row], "p": float(prob)}
        for row, prob in zip(x, p, strict=True)
    ]
    cases.append(
        {
            "x": [None] * len(MODEL_FEATURE_NAMES),
            "p": float(
                booster.predict(
                    xgb.DMatrix(
                        np.full((1, len(MODEL_FEATURE_NAMES)), np.nan),
                        feature_names=list(MODEL_FEATURE_NAMES),
                    )
                )[0]
            ),
        }
    )
    doc = {"feature_names": list(MODEL_FEATURE_NAMES), "cases": cases}
    path.write_text(json.dumps(doc, indent=None) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--trees", type=int, default=60)
    parser.add_argument(
        "--vectors",
        type=Path,
        default=None,
        help="also write feature vectors with XGBoost's own probabilities (test fixture)",
    )
    args = parser.parse_args(argv)
    booster = train(args.rows, args.seed, args.trees)
    booster.save_model(str(args.out))
    x_test, y_test = synthetic_payments(5_000, args.seed + 1)
    p = booster.predict(xgb.DMatrix(x_test, feature_names=list(MODEL_FEATURE_NAMES), missing=np.nan))
    accuracy = float(((p >= 0.5) == (y_test == 1)).mean())
    if args.vectors is not None:
        write_vectors(booster, args.vectors, args.seed + 2)
    print(f"wrote {args.out} ({args.trees} trees), held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
