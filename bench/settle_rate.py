"""How many payments per second the embedded worker settles against the in-process PSP simulator.

Feeds N accepted `payment.created` records (auto-capture) to a real SQLite store, hands their ids
to a `Worker` the way the tailer's hook does, and times until every payment is final. Run it once
with `--time-scale 0` (the simulator answers at once: the figure is the worker's own ceiling — the
Python event loop and the SQLite transactions) and once with `--time-scale 1` (real PSP latencies:
bounded by concurrency / latency, i.e. GATEWAY_WORKER_INFLIGHT_MAX and the PSPs' capacity).

    .venv/bin/python bench/settle_rate.py --payments 2000 --time-scale 0
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import msgspec
from bench_common import save_report
from gateway.processing.worker import Worker, WorkerSettings
from gateway.store.sqlite import SqliteStore

FINAL = ("captured", "failed", "canceled", "authorized")


def run(payments: int, time_scale: float, inflight: int, psps: tuple[str, ...],
        batch_max: int = 256, wave_linger_ms: float | None = None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        store = SqliteStore(Path(folder) / "gateway.db")
        store.migrate()
        store.create_merchant("Bench", "0" * 64, merchant_id="acct_bench")
        ids = [f"pay_{i:024d}" for i in range(payments)]
        records = []
        for lsn, pid in enumerate(ids, 1):
            payment = {
                "id": pid,
                "object": "payment",
                "status": "processing",
                "amount": 1000 + lsn % 500,
                "currency": "USD",
                "payment_method": "tok_visa",
                "capture": True,
                "created": 1,
                # The rest of what the API's create writes (about 1 KB in all, as over HTTP): the
                # worker decodes, rewrites and copies into every event the whole body.
                "capture_method": "automatic", "amount_capturable": 0, "amount_captured": 0,
                "amount_refunded": 0, "description": None, "metadata": {"order_id": f"order-{lsn}"},
                "customer": {"email": "buyer@example.com", "country": "US"},
                "risk": {"action": "allow", "risk_score": 12, "rule": None, "decline_code": None, "matched_rules": [],
                         "ruleset_version": 0, "merchant_ruleset_version": None, "model_hash": "f204bceb3838",
                         "review": False},
                "livemode": False,
            }
            records.append(
                (
                    lsn,
                    msgspec.json.encode(
                        {
                            "type": "payment.created",
                            "merchant_id": "acct_bench",
                            "status_code": 201,
                            "created_ms": 1,
                            "payment": payment,
                        }
                    ),
                )
            )
        for i in range(0, len(records), 1000):
            store.apply_wal_records(records[i : i + 1000])
        # The worker's start-up scan finds every `processing` payment, as after a crash; time from start.
        settings = WorkerSettings(psp_time_scale=time_scale, psps=psps, inflight_max=inflight,
                                  batch_records_max=batch_max)
        if wave_linger_ms is not None:
            settings = dataclasses.replace(settings, wave_linger_ms=wave_linger_ms)
        worker = Worker(store, settings)
        started = time.perf_counter()
        cpu_started = time.process_time()
        worker.start()
        conn = store._conn()
        while True:
            done = conn.execute("SELECT count(*) FROM payments WHERE status = 'captured'").fetchone()[0]
            if done >= payments:
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        batches = {b.name: round(b.mean_size, 1) for b in (worker.loads, worker.intents, worker.applies)}
        worker.stop()
        store.close()
    return {
        "payments": payments,
        "time_scale": time_scale,
        "inflight_max": inflight,
        "batch_records_max": batch_max,
        "wave_linger_ms": settings.wave_linger_ms,
        "mean_batch_size": batches,
        # The whole process (the worker thread and this poller, which mostly sleeps).
        "cpu_us_per_payment": round(cpu_s / payments * 1e6),
        "psps": list(psps),
        "elapsed_s": round(elapsed, 3),
        "payments_per_s": round(payments / elapsed, 1),
        "psp_calls_per_payment": 2,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payments", type=int, default=2000)
    ap.add_argument("--time-scale", type=float, action="append")
    ap.add_argument("--inflight", type=int, default=256)
    ap.add_argument("--psps", default="psp_a,psp_b")
    ap.add_argument("--batch-max", type=int, action="append",
                    help="[worker] batch_records_max; repeat to compare (1 = one transaction per store call)")
    ap.add_argument("--wave-linger-ms", type=float, action="append",
                    help="[worker] wave_linger_ms (default: the config's); repeat to compare")
    args = ap.parse_args()
    results = [
        run(args.payments, ts, args.inflight, tuple(args.psps.split(",")), bm, wl)
        for ts in args.time_scale or [0.0] for bm in args.batch_max or [256]
        for wl in args.wave_linger_ms or [None]
    ]
    for r in results:
        print(
            f"time_scale={r['time_scale']}: {r['payments']} payments authorized+captured in {r['elapsed_s']} s"
            f" = {r['payments_per_s']} payments/s, {r['cpu_us_per_payment']} us CPU/payment"
            f" (inflight_max={r['inflight_max']}, batch_records_max={r['batch_records_max']},"
            f" wave_linger_ms={r['wave_linger_ms']},"
            f" mean batch {r['mean_batch_size']})"
        )
    out = save_report("settle_rate", results)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
