"""The operator's cockpit in cluster mode: each `gateway worker` serves its pipeline metrics on its own
/metrics port, and merchant changes made with `gateway merchant ... --config FILE` reach every gateway
process of the cluster (two granian processes behind one port) without a restart."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from support import GATEWAY, auth, free_port, run_cli

from .conftest import ServiceUrls
from .test_cluster_processing import ProcessingCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


class MetricsCluster(ProcessingCluster):
    """A processing cluster whose workers serve /metrics on ports of their own."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.metrics_ports: list[int] = []

    def start_worker(self) -> subprocess.Popen[bytes]:
        port = free_port()
        self.metrics_ports.append(port)
        log = (self.tmp / f"worker-{len(self.workers)}.log").open("ab")
        proc = subprocess.Popen([GATEWAY, "worker", "--config", str(self.config_path), "--metrics-port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.worker_env)
        log.close()
        self.workers.append(proc)
        return proc

    def worker_metrics(self) -> list[str]:
        out = []
        for port in self.metrics_ports:
            try:
                out.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            except httpx.HTTPError:
                out.append("")
        return out


@pytest.fixture(scope="module")
def mc(services: ServiceUrls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsCluster]:
    yield from MetricsCluster(services, tmp_path_factory.mktemp("cluster-ops"), psp_time_scale=0.0).serving()


def _until(what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def _total(texts: list[str], prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for t in texts for line in t.splitlines() if line.startswith(prefix))


def test_each_worker_serves_its_pipeline_metrics_on_its_own_port(mc: MetricsCluster) -> None:
    n = 10
    with httpx.Client(timeout=10) as c:
        for i in range(n):
            mc.create(amount=1000 + i, client=c)
    final = 'gateway_payments_final_total{status="authorized",decline_code=""}'
    _until("both workers' metrics count every authorization", lambda: _total(mc.worker_metrics(), final) == n)
    texts = mc.worker_metrics()
    assert all("# TYPE gateway_feed_consumer_lag_messages gauge" in t for t in texts)
    assert _total(texts, "gateway_feed_records_total") >= n
    assert all('gateway_psp_breaker_state{psp="psp_a"} 0' in t for t in texts)
    # Observed by the worker that received the payment's record (one another worker took over, after a
    # lost claim race, knows no acknowledgement time and does not guess one).
    assert 0 < _total(texts, "gateway_payment_ack_to_final_seconds_count") <= n
    promtool = shutil.which("promtool")
    if promtool is not None:
        lint = subprocess.run([promtool, "check", "metrics"], input=texts[0], capture_output=True, text=True,
                              timeout=30, check=False)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def _statuses(mc: MetricsCluster, key: str, n: int = 6) -> set[int]:
    """Statuses of `n` creates on new connections (the kernel spreads them over both processes)."""
    out = set()
    for i in range(n):
        with httpx.Client(timeout=10) as c:
            out.add(c.post(f"{mc.gateway.url}/v1/payments", headers=auth(key), json={
                "amount": 100 + i, "currency": "USD", "payment_method": "tok_visa"}).status_code)
    return out


def test_key_rotation_and_rate_limits_reach_every_gateway_process(mc: MetricsCluster) -> None:
    cfg = str(mc.config_path)
    m = json.loads(run_cli("merchant", "create", "--name", "Cluster Shop", "--config", cfg).stdout)
    old = m["api_key"]
    assert _statuses(mc, old) == {201}
    new = json.loads(run_cli("merchant", "rotate-key", m["id"], "--overlap-s", "0", "--config", cfg).stdout)["api_key"]
    _until("the old key is refused by both processes", lambda: _statuses(mc, old) == {401})
    assert _statuses(mc, new) == {201}
    run_cli("merchant", "update", m["id"], "--rate-limit-per-s", "0.01", "--rate-limit-burst", "1", "--config", cfg)
    _until("the new rate limit answers 429", lambda: 429 in _statuses(mc, new))
    listed = json.loads(run_cli("merchant", "list", "--config", cfg).stdout)
    mine = next(x for x in listed if x["id"] == m["id"])
    assert mine["rate_limit_per_s"] == 0.01 and mine["key_prefixes"] == [new[:12]]
