"""Smoke test of the HTTP benchmark harness: a seconds-long run against the floor app only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_quick_bench_against_floor_writes_report_with_every_figure(tmp_path: Path) -> None:
    if shutil.which("go") is None and not (REPO / ".cache" / "tools" / "bin" / "loadgen").exists():
        pytest.skip("the Go toolchain is needed to build bench/loadgen")
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
        assert step["planned"] == int(step["offered_rate"]) and step["sent"] == step["planned"]
        # The floor app answers 201 to everything, so every request is a success.
        assert step["status_counts"] == {"201": step["planned"]}
        assert step["error_rate"] == 0.0
        assert step["achieved_rate"] > 0.5 * step["offered_rate"]
        assert sum(step["histogram_counts"]) == step["planned"]
    assert "knee" in floor
    assert {"gateway_over_floor", "gateway_over_baseline"} <= set(report["ratios"])
    assert "capacity" in floor
    assert "| floor |" in (out / "report.md").read_text()
    assert (out / "latency_vs_rate.png").stat().st_size > 1000
    assert (out / "latency_histogram.png").stat().st_size > 1000
