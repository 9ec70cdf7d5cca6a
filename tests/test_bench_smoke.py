"""Smoke tests of the benchmark harnesses: seconds-long k6 runs against the floor app (http_bench.py) and the
embedded gateway (pipeline.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_quick_k6_bench_against_floor_writes_report_with_every_figure(tmp_path: Path) -> None:
    if shutil.which("go") is None and not (REPO / ".cache" / "tools" / "bin" / "k6").exists():
        pytest.skip("k6 is built with the Go toolchain (bench/tools.sh)")
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "http_bench.py"),
            "--quick",
            "--systems",
            "floor",
            "--rates",
            "100,200",
            "--step-seconds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())

    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"] is not None
    assert report["config"]["rates"] == [100.0, 200.0]
    floor = report["systems"]["floor"]
    assert [s["offered_rate"] for s in floor["steps"]] == [100.0, 200.0]
    for step in floor["steps"]:
        lat = step["latency_corrected"]
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]
        # Open loop: k6 scheduled one iteration per 1/rate s (plus the one at t = 0), and at these rates
        # every VU is free, so every scheduled request was sent and none was dropped.
        assert step["planned"] == int(step["offered_rate"])
        assert step["planned"] <= step["scheduled"] <= step["planned"] + 1
        assert step["sent"] == step["scheduled"] and step["dropped"] == 0
        # The floor app answers 201 to everything, so every request is a success.
        assert step["status_counts"] == {"201": step["sent"]}
        assert step["error_rate"] == 0.0 and step["errors"] == 0
        assert step["achieved_rate"] > 0.5 * step["offered_rate"]
        assert step["send_rate"] >= 0.95 * step["offered_rate"]
        assert sum(step["histogram_counts"]) == step["completed"] == step["sent"]
        assert lat["count"] == step["sent"]
        # Corrected latency runs from the intended send time, so it is never below k6's own
        # (uncorrected) request duration.
        assert lat["p50_ms"] >= step["latency_uncorrected"]["p50_ms"]
        gen = step["generator"]
        assert gen["vus"] >= 1 and gen["saturated"] is False
        for share in (gen["cpu_share"], gen["cores_busy_share"], step["server_cores_busy_share"]):
            assert share is None or 0.0 <= share <= 1.0
        assert step["machine_iowait_share"] is None or 0.0 <= step["machine_iowait_share"] <= 1.0
    assert report["config"]["load_generator"].startswith("k6 v")
    assert "knee" in floor
    assert {"gateway_over_floor", "gateway_over_baseline"} <= set(report["ratios"])
    assert "capacity" in floor
    assert "| floor |" in (out / "report.md").read_text()
    assert (out / "latency_vs_rate.png").stat().st_size > 1000
    assert (out / "latency_histogram.png").stat().st_size > 1000


@pytest.mark.timeout(150)
def test_quick_pipeline_bench_embedded_settles_every_accepted_payment(tmp_path: Path) -> None:
    if shutil.which("go") is None and not (REPO / ".cache" / "tools" / "bin" / "k6").exists():
        pytest.skip("k6 is built with the Go toolchain (bench/tools.sh)")
    out = tmp_path / "pipeline"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pipeline.py"), "--mode", "embedded", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())

    assert report["mode"] == "embedded" and report["config"]["psp_time_scale"] == 0.0
    (step,) = report["steps"]
    # Every acknowledged payment was followed from k6's log to a final status in the store.
    assert step["acknowledged"] > 0 and step["status_counts"].get("201") == step["acknowledged"]
    assert step["acknowledged_logged"] == step["acknowledged"]
    assert step["drained"] is True and step["not_final_at_end"] == 0
    assert step["final_at_end"] == step["acknowledged"] == report["totals"]["acknowledged"]
    assert report["totals"]["all_final"] is True
    assert step["generator_limited"] is False and step["send_rate"] >= 0.95 * step["offered_rate"]
    # A low rate is settled as fast as it is accepted; latencies are ordered and positive.
    assert 0.5 * step["offered_rate"] <= step["accepted_per_s"] <= 1.1 * step["offered_rate"]
    assert step["settled_per_s"] is not None and step["settled_per_s"] > 0.5 * step["accepted_per_s"]
    ack, final = step["ack_latency"], step["time_to_final"]
    assert 0 < ack["p50_ms"] <= ack["p99_ms"] <= ack["max_ms"] < 2000
    assert final["count"] == step["acknowledged"]
    assert 0 <= final["p50_ms"] <= final["p99_ms"] <= final["max_ms"] < 30_000
    samples = step["backlog_samples"]
    assert len(samples) >= 3 and all(s["backlog"] >= 0 for s in samples)
    assert samples[-1]["backlog"] == 0 and samples[-1]["final"] >= step["acknowledged"]
    # CPU per payment of the HTTP process(es) and of the worker child, from /proc.
    assert set(step["cpu"]) == {"http", "worker"}
    for group in step["cpu"].values():
        assert group["processes"] >= 1 and 0 < group["cpu_us_per_payment"] < 1_000_000
    assert step["sql"] is None  # SQLite keeps no statement counters: null, and the report says so
    assert "SQLite" in report["method"]["sql"]
    assert step["psp_calls"] is None or sum(step["psp_calls"].values()) >= step["acknowledged"]
    if report["plots"]:
        assert (out / "rate_vs_settled.png").stat().st_size > 1000
        assert (out / "backlog.png").stat().st_size > 1000
    else:
        assert any("matplotlib" in n for n in report["notes"])


@pytest.mark.timeout(120)
def test_psp_client_bench_times_every_call_of_both_clients(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "psp_client.py"), "--calls", "200", "--inflight", "4,16"],
        capture_output=True, text=True, timeout=110, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = Path(proc.stdout.strip().splitlines()[-1].removeprefix("saved "))
    report = json.loads(saved.read_text())
    saved.unlink()
    assert report["calls"] == 200 and [r["inflight"] for r in report["rows"]] == [4, 16]
    for row in report["rows"]:
        for client in ("aiohttp_gateway_client", "httpx"):
            assert row[client]["calls_per_s"] > 0 and 0 < row[client]["cpu_us_per_call"] < 1_000_000
