"""A real Prometheus (Debian's, started by deploy/prometheus.sh on loopback) scraping a real gateway:
a PSP outage in the simulator is seen through Prometheus' HTTP API, first as the breaker metric
changing to open, then as the breaker alert going pending and firing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import REPO, Gateway, auth, free_port, start_psp_sim

DEPLOY = REPO / "deploy" / "prometheus.sh"
ALERT = "GatewayPSPBreakerOpen"


def _prometheus(env: dict[str, str], action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(DEPLOY), action], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture
def prometheus_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    if shutil.which("prometheus") is None:
        installed = _prometheus({}, "install")
        if installed.returncode != 0:
            pytest.skip(f"prometheus could not be installed: {installed.stderr[-500:]}")
    # The shipped rules, with the breaker alert's `for` cut from 1m to 5s so the test sees it fire
    # soon; the expression is the one operators get.
    rules = (REPO / "deploy/prometheus/alerts.yml").read_text()
    marker = "expr: max by (instance, psp) (gateway_psp_breaker_state) == 2\n        for: 1m"
    assert marker in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(marker, marker.replace("for: 1m", "for: 5s")))
    env = {"SERVICES_DIR": str(tmp_path / "services"), "PROMETHEUS_PORT": str(free_port()),
           "PROMETHEUS_SCRAPE_INTERVAL": "1s", "PROMETHEUS_EVAL_INTERVAL": "1s",
           "PROMETHEUS_RULES": str(tmp_path / "alerts.yml")}
    yield env
    _prometheus(env, "stop")


def _query(base: str, expr: str) -> list[dict]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def _alert_states(base: str) -> set[str]:
    r = httpx.get(f"{base}/api/v1/alerts", timeout=10)
    assert r.status_code == 200, r.text
    return {a["state"] for a in r.json()["data"]["alerts"] if a["labels"]["alertname"] == ALERT}


def test_a_psp_outage_opens_the_breaker_and_fires_its_alert_in_prometheus(tmp_path: Path,
                                                                         prometheus_env: dict[str, str]) -> None:
    sim_port = free_port()
    sim = start_psp_sim(sim_port, ["psp_a", "psp_b"], 0.0, tmp_path / "psp-sim.log")
    config = (f'[psp]\nurl = "http://127.0.0.1:{sim_port}"\npsps = ["psp_a", "psp_b"]\ntime_scale = 0\n'
              "timeout_ms = 2000\n[router.breaker]\ncooldown_s = 600\n")
    g = Gateway(tmp_path / "data", config_text=config).start()
    try:
        env = {**prometheus_env, "PROMETHEUS_TARGETS": f"127.0.0.1:{g.port}"}
        started = _prometheus(env, "start")
        assert started.returncode == 0, started.stderr
        base = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"
        with httpx.Client(base_url=g.url, headers=auth(), timeout=10) as c:
            assert c.post("/v1/payments", json={"amount": 100, "currency": "USD",
                                                "payment_method": "tok_visa"}).status_code == 201
            deadline = time.monotonic() + 60
            while _query(base, 'gateway_psp_breaker_state{psp="psp_a"} == 0') == []:
                assert time.monotonic() < deadline, "Prometheus never scraped a closed breaker"
                time.sleep(0.5)
            assert _alert_states(base) == set()

            os.killpg(sim.pid, signal.SIGKILL)  # the outage: every PSP call now fails to connect
            sim.wait(10)
            for i in range(12):
                assert c.post("/v1/payments", json={"amount": 200 + i, "currency": "USD",
                                                    "payment_method": "tok_visa"}).status_code == 201
        seen: set[str] = set()
        deadline = time.monotonic() + 90
        while "firing" not in seen:
            seen |= _alert_states(base)
            assert time.monotonic() < deadline, f"{ALERT} never fired (states seen: {seen})"
            time.sleep(0.25)
        assert "pending" in seen, "the alert fired without being pending first"
        opened = _query(base, "gateway_psp_breaker_state == 2")
        assert {r["metric"]["psp"] for r in opened} == {"psp_a", "psp_b"}
        errors = _query(base, 'sum(gateway_psp_requests_total{operation="authorize",outcome="error"})')
        assert float(errors[0]["value"][1]) >= 5
    finally:
        g.stop()
        if sim.poll() is None:
            sim.kill()
