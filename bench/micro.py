"""Micro benchmarks of the fast path through its Python API (`gateway._fastpath`).

1. The whole fast-path call (`FastPath.create_payment`) in ns/op, median and P99, for distinct
   idempotency keys, no key, and replays; per-stage figures from the engine's own stage histograms
   (mean, and P50/P99 as histogram bucket bounds) over the same calls.
2. The plain-Python reference for each stage (the logic bench/baseline_app.py runs: pydantic
   validation and PAN scan, dict idempotency with a SHA-256 fingerprint, a token bucket, the risk
   decision from tests/reference/risk_ref.py when present) and the ratio Python / Rust.
3. Small stage functions exposed on their own (`contains_pan`, `currency_exponent`).
4. The WAL: records/s and commit latency (create → durable) at several group-commit settings, with
   concurrent writers so batches actually form.

Stages or functions the built extension does not expose are skipped with a message saying so.

    python bench/micro.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import run_threads_s

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WAL_SETTINGS = [(100, 64), (200, 512), (1000, 512), (1000, 4096)]


def body(i: int, card: int | None = None) -> bytes:
    card = i % 5000 if card is None else card
    return json.dumps(
        {
            "amount": 1000 + i % 997,
            "currency": "USD",
            "payment_method": f"tok_card_{card:06d}",
            "capture": True,
            "description": "micro bench",
            "metadata": {"order_id": f"ord_{i}"},
            "customer": {
                "email": f"buyer{card}@example.com",
                "ip": "10.1.2.3",
                "device_id": f"dev_{card}",
                "country": "US",
            },
        },
        separators=(",", ":"),
    ).encode()


def timed(fn: Callable[[int], Any], n: int) -> dict[str, float]:
    """Per-call wall time in ns: median, P99, mean; each call timed on its own."""
    samples = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        samples[i] = clock() - t0
    return {
        "ns_p50": float(np.percentile(samples, 50)),
        "ns_p99": float(np.percentile(samples, 99)),
        "ns_mean": float(samples.mean()),
        "ops": n,
    }


def parse_stage_histograms(text: str) -> dict[str, dict[str, float]]:
    """Per stage: count, mean ns, and the bucket upper bounds holding P50 and P99 (Prometheus text)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(
            r'gateway_fastpath_stage_seconds_(bucket|sum|count)\{stage="([^"]+)"(?:,le="([^"]+)")?\} (\S+)',
            line,
        )
        if not m:
            continue
        kind, stage, le, value = m.groups()
        if kind == "bucket":
            buckets.setdefault(stage, []).append((float("inf") if le == "+Inf" else float(le), float(value)))
        elif kind == "sum":
            sums[stage] = float(value)
        else:
            counts[stage] = float(value)
    out: dict[str, dict[str, float]] = {}
    for stage, bs in buckets.items():
        total = counts.get(stage, 0)
        if not total:
            continue

        def bound(q: float, bs: list[tuple[float, float]] = bs, total: float = total) -> float:
            for le, cum in bs:
                if cum >= q * total:
                    return le * 1e9
            return float("inf")

        out[stage] = {
            "count": total,
            "ns_mean": sums.get(stage, 0) / total * 1e9,
            "ns_p50_le": bound(0.5),
            "ns_p99_le": bound(0.99),
        }
    return out


def stage_deltas(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean ns per stage over the calls between two snapshots."""
    out = {}
    for stage, a in after.items():
        b = before.get(stage, {"count": 0, "ns_mean": 0})
        n = a["count"] - b["count"]
        if n > 0:
            out[stage] = (a["ns_mean"] * a["count"] - b["ns_mean"] * b["count"]) / n
    return out


def open_fastpath(fp_mod: Any, wal_dir: Path, **overrides: Any) -> Any:
    config = {"wal_dir": str(wal_dir), "rate_limit_per_s": 1e12, "rate_limit_burst": 1e12, **overrides}
    return fp_mod.FastPath(json.dumps(config))


def bench_fastpath(fp_mod: Any, work: Path, n: int) -> dict[str, Any]:
    fp = open_fastpath(fp_mod, work / "wal-calls", fsync_interval_us=200)
    results: dict[str, Any] = {}
    try:
        bodies = [body(i) for i in range(n)]
        merchant = "mer_micro"
        fp.create_payment(merchant, "warm", bodies[0])
        snap0 = parse_stage_histograms(fp.metrics_text())
        results["create_distinct_keys"] = timed(lambda i: fp.create_payment(merchant, f"k{i}", bodies[i]), n)
        snap1 = parse_stage_histograms(fp.metrics_text())
        results["create_no_key"] = timed(lambda i: fp.create_payment(merchant, None, bodies[i]), n)
        results["create_replay"] = timed(lambda i: fp.create_payment(merchant, f"k{i}", bodies[i]), n)
        replay = fp.create_payment(merchant, "k0", bodies[0])
        results["replay_check"] = {"status": replay.status, "replayed": replay.replayed}
        results["stage_mean_ns_distinct_keys"] = stage_deltas(snap0, snap1)
        results["stage_histograms_all_calls"] = parse_stage_histograms(fp.metrics_text())
    finally:
        fp.close()
    return results


def bench_functions(fp_mod: Any, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    texts = [f"order {i} for buyer{i}@example.com tok_card_{i:06d}" for i in range(n)]
    for name, fn in (
        ("contains_pan", lambda i: fp_mod.contains_pan(texts[i])),
        ("currency_exponent", lambda i: fp_mod.currency_exponent("JPY" if i % 2 else "USD")),
    ):
        if hasattr(fp_mod, name.split("(")[0]):
            out[name] = timed(fn, n)
        else:
            out[name] = {"skipped": f"gateway._fastpath has no {name}"}
    return out


def python_reference(work: Path, n: int) -> dict[str, Any]:
    """The baseline app's per-stage logic, timed the same way as the Rust call."""
    cfg = work / "baseline.json"
    cfg.write_text(
        json.dumps(
            {"wal_path": str(work / "baseline-wal.log"), "velocity_max": 10**9, "rate_limit_per_s": 1e12}
        )
    )
    os.environ["BASELINE_CONFIG"] = str(cfg)
    sys.path.insert(0, str(BENCH))
    import hashlib

    baseline = importlib.import_module("baseline_app")
    bodies = [body(i) for i in range(n)]
    pan = baseline.PAN_RE

    def validate(i: int) -> Any:
        raw = bodies[i]
        pan.search(raw.decode())
        return baseline.PaymentCreate.model_validate_json(raw).model_dump()

    table: dict[tuple[str, str], Any] = {}

    def idempotency(i: int, prefix: str = "k") -> None:
        slot = ("mer_micro", f"{prefix}{i}")
        fingerprint = hashlib.sha256(bodies[i]).hexdigest()
        if slot not in table:
            table[slot] = (fingerprint, 201, bodies[i])

    def rate_limit(i: int) -> bool:
        return bool(baseline._allow("mer_micro"))

    decoded = [baseline.PaymentCreate.model_validate_json(b).model_dump() for b in bodies]

    def risk(i: int) -> Any:
        return baseline.RISK.decide("mer_micro", decoded[i])

    pending: list[bytes] = []

    def wal_append(i: int) -> None:
        record = json.dumps({"id": f"pay_{i}", **decoded[i]}).encode() + b"\n"
        pending.append(record)

    def total(i: int) -> None:
        validate(i)
        idempotency(i, "t")
        rate_limit(i)
        risk(i)
        wal_append(i)

    out = {}
    for name, fn in (
        ("validate", validate),
        ("idempotency", idempotency),
        ("rate_limit", rate_limit),
        ("risk", risk),
        ("wal_append", wal_append),
        ("total", total),
    ):
        out[name] = timed(fn, n)
    out["risk_implementation"] = type(baseline.RISK).__name__
    return out


def wal_writer(fp: Any, t: int, stop: float, latencies: list[int], failures: list[int]) -> None:
    """One merchant's writer: create, wait until durable, repeat until `stop`."""
    i = 0
    clock = time.perf_counter_ns
    while time.monotonic() < stop:
        t0 = clock()
        out = fp.create_payment(f"mer_{t}", f"w{t}-{i}", body(i))
        status, lsn = out.status, out.lsn
        if lsn and not fp.wait_committed(lsn, 5000):
            failures[0] += 1
        latencies.append(clock() - t0)
        i += 1
        if status >= 300:
            failures[0] += 1


def bench_wal(fp_mod: Any, work: Path, seconds: float, threads: int) -> list[dict[str, Any]]:
    rows = []
    for interval_us, batch_max in WAL_SETTINGS:
        wal_dir = work / f"wal-{interval_us}-{batch_max}"
        try:
            fp = open_fastpath(fp_mod, wal_dir, fsync_interval_us=interval_us, batch_records_max=batch_max)
        except (ValueError, OSError) as exc:
            rows.append({"fsync_interval_us": interval_us, "batch_records_max": batch_max, "error": str(exc)})
            continue
        latencies: list[list[int]] = [[] for _ in range(threads)]
        stop = time.monotonic() + seconds
        failures = [0]

        wall = run_threads_s([
            threading.Thread(target=wal_writer, args=(fp, t, stop, latencies[t], failures))
            for t in range(threads)
        ])
        fp.close()
        all_lat = np.array([x for lat in latencies for x in lat], dtype=np.int64)
        batches = parse_batches(fp.metrics_text())
        rows.append(
            {
                "fsync_interval_us": interval_us,
                "batch_records_max": batch_max,
                "writers": threads,
                "records": int(all_lat.size),
                "records_per_s": round(all_lat.size / wall, 1),
                "commit_latency_us_p50": round(float(np.percentile(all_lat, 50)) / 1e3, 1)
                if all_lat.size
                else None,
                "commit_latency_us_p99": round(float(np.percentile(all_lat, 99)) / 1e3, 1)
                if all_lat.size
                else None,
                "failures": failures[0],
                **batches,
            }
        )
    return rows


def parse_batches(text: str) -> dict[str, float]:
    """Mean records per group commit, when the engine exports a batch-size histogram."""
    s = c = None
    for line in text.splitlines():
        m = re.match(r"(gateway_\w*batch\w*)_(sum|count)(?:\{[^}]*\})? (\S+)", line)
        if m:
            if m.group(2) == "sum":
                s = float(m.group(3))
            else:
                c = float(m.group(3))
    return {"mean_records_per_commit": round(s / c, 1)} if s is not None and c else {}


def fmt_ns(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.2f} µs" if x >= 1000 else f"{x:.0f} ns"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    n = 2000 if args.quick else 50_000
    # The Python reference (risk with the XGBoost model in pure Python) is ~100x slower: fewer calls.
    n_ref = 300 if args.quick else 5_000
    wal_seconds = 0.3 if args.quick else 2.0
    started = dt.datetime.now(dt.UTC)
    out_dir = args.out or BENCH / "results" / f"micro-{started.strftime('%Y%m%dT%H%M%SZ')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="micro-", dir=str(out_dir)))
    report: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "ops_per_case": n,
        "python_reference_ops_per_case": n_ref,
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }
    try:
        fp_mod = importlib.import_module("gateway._fastpath")
    except ImportError as exc:
        fp_mod = None
        report["fastpath"] = {"skipped": f"gateway._fastpath is not importable ({exc}); run `make install`"}
        print(f"micro: skipping every fast-path case: {report['fastpath']['skipped']}")
    print("micro: Python reference stages ...", flush=True)
    report["python_reference"] = python_reference(work, n_ref)
    if fp_mod is not None:
        report["stages_exported"] = list(getattr(fp_mod, "STAGES", []))
        if hasattr(fp_mod, "FastPath"):
            print("micro: fast-path calls ...", flush=True)
            report["fastpath"] = bench_fastpath(fp_mod, work, n)
            print("micro: WAL group commit ...", flush=True)
            report["wal"] = bench_wal(fp_mod, work, wal_seconds, threads=8)
        else:
            report["fastpath"] = {"skipped": "gateway._fastpath has no FastPath class yet"}
            print("micro: gateway._fastpath has no FastPath class yet; skipping calls and WAL")
        report["functions"] = bench_functions(fp_mod, n)

    lines = [
        f"# Micro benchmarks {report['started_at']}",
        "",
        (
            f"{n} calls per case, each timed on its own; load average at start "
            f"{[round(x, 2) for x in report['load_average_at_start']]} on {report['cores']} cores."
        ),
        "",
        (
            "| stage | Rust mean (engine histogram) | Rust P50 / P99 bucket | Python ref P50 | Python ref P99 | "
            "Python / Rust (mean) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    fast = report.get("fastpath", {})
    rust_means = fast.get("stage_mean_ns_distinct_keys", {}) if isinstance(fast, dict) else {}
    hists = fast.get("stage_histograms_all_calls", {}) if isinstance(fast, dict) else {}
    ref = report["python_reference"]
    for stage in ("validate", "idempotency", "rate_limit", "risk", "wal_append", "total"):
        r = rust_means.get(stage)
        h = hists.get(stage, {})
        py = ref.get(stage, {})
        ratio = f"{py['ns_mean'] / r:.1f}x" if r and py else "-"
        bucket = f"≤{fmt_ns(h['ns_p50_le'])} / ≤{fmt_ns(h['ns_p99_le'])}" if h else "not exported"
        lines.append(
            f"| {stage} | {fmt_ns(r) if r else 'not exported'} | {bucket} | {fmt_ns(py.get('ns_p50'))} | "
            f"{fmt_ns(py.get('ns_p99'))} | {ratio} |"
        )
    if "create_distinct_keys" in fast:
        lines += ["", "| Python call `FastPath.create_payment` | P50 | P99 | mean |", "|---|---|---|---|"]
        for case in ("create_distinct_keys", "create_no_key", "create_replay"):
            c = fast[case]
            lines.append(
                f"| {case} | {fmt_ns(c['ns_p50'])} | {fmt_ns(c['ns_p99'])} | {fmt_ns(c['ns_mean'])} |"
            )
        call = fast["create_distinct_keys"]
        lines.append(
            f"\nWhole call vs Python reference total: {ref['total']['ns_p50'] / call['ns_p50']:.1f}x at P50, "
            f"{ref['total']['ns_p99'] / call['ns_p99']:.1f}x at P99, {ref['total']['ns_mean'] / call['ns_mean']:.1f}x "
            "on the mean (the Rust call includes the WAL append; the Python total does not fsync either)."
        )
    elif "skipped" in fast:
        lines += ["", f"Fast path: skipped, {fast['skipped']}."]
    for name, res in report.get("functions", {}).items():
        lines.append(
            f"- `{name}`: "
            + (
                res["skipped"]
                if "skipped" in res
                else f"P50 {fmt_ns(res['ns_p50'])}, P99 {fmt_ns(res['ns_p99'])}"
            )
        )
    if report.get("wal"):
        lines += [
            "",
            (
                "| fsync_interval_us | batch_records_max | writers | records/s | commit P50 µs | commit P99 µs | "
                "records/commit |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["wal"]:
            if "error" in row:
                lines.append(
                    f"| {row['fsync_interval_us']} | {row['batch_records_max']} | error: {row['error']} |||||"
                )
                continue
            lines.append(
                f"| {row['fsync_interval_us']} | {row['batch_records_max']} | {row['writers']} | "
                f"{row['records_per_s']:.0f} | {row['commit_latency_us_p50']} | {row['commit_latency_us_p99']} | "
                f"{row.get('mean_records_per_commit', '-')} |"
            )
    lines.append(
        f"\nPython reference risk: {ref.get('risk_implementation')} (lists, velocity rules and the XGBoost model). "
        "The Rust risk stage runs with whatever `FastPath` exposes for configuration; this build takes no "
        "lists, rules or model through it, so its risk figure is not like-for-like until it does."
    )
    (out_dir / "micro.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "micro.md").write_text("\n".join(lines) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    print(f"micro: report in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
