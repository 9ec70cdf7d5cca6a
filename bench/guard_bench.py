"""What the hostile-input guard costs per request: the Rust scans exposed to Python and the API's
checks before routing, in ns/op (median of repeated timeit runs), saved as a JSON report.

    python bench/guard_bench.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import timeit
from pathlib import Path
from typing import Any

from gateway._fastpath import contains_pan, json_refusal, mask_pans
from gateway.api import guard

BENCH = Path(__file__).resolve().parent
CREATE_BODY = json.dumps({
    "amount": 1000, "currency": "USD", "payment_method": "tok_card_000123", "capture": True,
    "description": "micro bench", "metadata": {"order_id": "ord_123456"},
    "customer": {"email": "buyer@example.com", "ip": "10.1.2.3", "device_id": "dev_1", "country": "US"},
}, separators=(",", ":")).encode()


class _Headers(dict[str, str]):
    pass


class _Scope:
    def __init__(self) -> None:
        self.headers = _Headers({"authorization": "Bearer sk_test_demo", "idempotency-key": "order-1001-abcdef",
                                 "content-type": "application/json", "content-length": str(len(CREATE_BODY))})


def ns_per_op(fn: Any, number: int = 20_000, repeat: int = 7) -> float:
    runs = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args()
    scope = _Scope()
    figures = {
        "json_refusal_create_body_ns": ns_per_op(lambda: json_refusal(CREATE_BODY)),
        "contains_pan_path_ns": ns_per_op(lambda: contains_pan("/v1/payments/pay_0123456789abcdefghijklmn")),
        "mask_pans_message_ns": ns_per_op(lambda: mask_pans("No such payment: 'pay_0123456789abcdefghijklmn'")),
        "check_request_list_ns": ns_per_op(lambda: guard.check_request("/v1/payments", "limit=10&starting_after=x")),
        "idempotency_key_ns": ns_per_op(lambda: guard.idempotency_key(scope)),
        "strict_int_ns": ns_per_op(lambda: guard.strict_int("100", 1, 100)),
    }
    for name, value in figures.items():
        print(f"{name:32s} {value:10.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"guard-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"create_body_bytes": len(CREATE_BODY), **figures}, indent=2))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
