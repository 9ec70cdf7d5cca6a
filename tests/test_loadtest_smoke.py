"""Smoke test of the locust scenarios: a few seconds of merchant traffic against a real gateway process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, stop_process, wait_ready

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
GATEWAY = VENV_BIN / "gateway"
LOCUST = VENV_BIN / "locust"
CONFIG = REPO / "bench" / "gateway-bench.toml"


@pytest.fixture
def gateway_url(tmp_path: Path) -> Iterator[str]:
    if (
        not GATEWAY.exists()
        or subprocess.run([str(GATEWAY), "--help"], check=False, capture_output=True, timeout=30).returncode
    ):
        pytest.skip("the gateway CLI is not importable yet (make install)")
    port = free_port()
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [
            str(GATEWAY),
            "serve",
            "--config",
            str(CONFIG),
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            str(port),
            "--demo",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", proc, "gateway", 60, (tmp_path / "gateway.log").read_text, poll_s=0.2)
        yield url
    finally:
        stop_process(proc, 15, kill_wait_s=5)
        log.close()


@pytest.mark.timeout(120)
def test_locust_merchant_scenarios_run_without_failures(gateway_url: str, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    proc = subprocess.run(
        [
            str(LOCUST),
            "-f",
            str(REPO / "loadtests" / "locustfile.py"),
            "--headless",
            "-u",
            "5",
            "-r",
            "5",
            "-t",
            "4s",
            "--host",
            gateway_url,
            "--csv",
            str(prefix),
            "--only-summary",
            "--exit-code-on-error",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, "GATEWAY_API_KEYS": "sk_test_demo"},
    )
    stats = Path(f"{prefix}_stats.csv").read_text().splitlines()
    rows = {row["Name"]: row for row in csv.DictReader(stats)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert int(total["Failure Count"]) == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The common scenario actually created payments, and retries were answered.
    assert int(rows["POST /v1/payments"]["Request Count"]) > 0
    assert proc.returncode == 0, proc.stderr[-3000:]
