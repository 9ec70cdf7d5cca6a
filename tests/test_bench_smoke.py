"""Smoke test of the HTTP benchmark harness: a seconds-long k6 run against the floor app only."""

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
