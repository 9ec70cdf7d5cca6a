"""The async path's metrics on the gateway's /metrics (embedded mode: the worker child's included), read
from a real gateway after real traffic: what settled, how, through which PSP, and the store's checks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from metric_names import families
from support import Gateway, auth

FAST_ENV = {
    "GATEWAY_PSP_TIME_SCALE": "0", "GATEWAY_PSPS": "psp_a,psp_b", "GATEWAY_RECONCILE_INTERVAL_MS": "100",
    "GATEWAY_METRICS_CHECK_INTERVAL_MS": "200", "GATEWAY_LEDGER_CHECK_INTERVAL_MS": "200",
}
APPROVED = 12
DECLINED = 3
_SAMPLE = re.compile(r"^([a-z_:][a-z0-9_:]*)(\{[^}]*\})? (\S+)$")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(s: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


def _wait_for(g: Gateway, check: str, timeout_s: float = 30) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Polls /metrics until `check` (a Python expression over `s` and `value`) holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = samples(httpx.get(f"{g.url}/metrics", timeout=10).text)
        if eval(check, {"value": value, "s": s}):
            return s
        assert time.monotonic() < deadline, f"metrics never satisfied {check!r}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("metrics") / "data", extra_env=FAST_ENV).start()
    with httpx.Client(base_url=g.url, headers=auth(), timeout=10) as c:
        for i in range(APPROVED + DECLINED):
            token = "tok_visa" if i < APPROVED else "tok_decline_stolen"
            r = c.post("/v1/payments", json={"amount": 1000 + i, "currency": "USD", "payment_method": token,
                                             "capture": True})
            assert r.status_code == 201, r.text
        r = c.post("/v1/payments", json={"amount": 777, "currency": "USD", "payment_method": "tok_timeout",
                                         "capture": False})
        assert r.status_code == 201, r.text
    yield g
    g.stop()


def test_final_statuses_decline_codes_and_time_to_final_are_counted(traffic: Gateway) -> None:
    s = _wait_for(traffic, "value(s, 'gateway_payments_final_total', status='failed', decline_code='stolen_card') == 3"
                           " and value(s, 'gateway_payments_final_total', status='authorized', decline_code='') >= 12")
    assert value(s, "gateway_payments_final_total", status="failed", decline_code="stolen_card") == DECLINED
    # The timeout went to pending_verification first, then was resolved by a status query.
    assert value(s, "gateway_payments_pending_verification_total") >= 1
    assert value(s, "gateway_payment_ack_to_final_seconds_count") >= APPROVED + DECLINED
    assert value(s, "gateway_payment_ack_to_final_seconds_bucket", le="+Inf") == value(
        s, "gateway_payment_ack_to_final_seconds_count")
    s = _wait_for(traffic, "value(s, 'gateway_operations_total', kind='capture', status='succeeded') == 12")
    assert value(s, "gateway_risk_decisions_total", action="allow", rule="") == APPROVED + DECLINED + 1


def test_psp_calls_are_counted_by_psp_operation_and_outcome(traffic: Gateway) -> None:
    s = _wait_for(traffic, "value(s, 'gateway_operations_total', kind='capture', status='succeeded') == 12")
    by_outcome: dict[str, float] = {}
    for (name, labels), v in s.items():
        if name == "gateway_psp_requests_total" and ("operation", "authorize") in labels:
            outcome = dict(labels)["outcome"]
            by_outcome[outcome] = by_outcome.get(outcome, 0) + v
    assert by_outcome.get("approved", 0) >= APPROVED
    assert by_outcome.get("hard_decline", 0) == DECLINED  # never retried
    assert by_outcome.get("timeout", 0) >= 1
    captures = sum(v for (name, labels), v in s.items()
                   if name == "gateway_psp_requests_total" and ("operation", "capture") in labels)
    assert captures == APPROVED
    latency_count = sum(v for (name, labels), v in s.items()
                        if name == "gateway_psp_request_seconds_count" and ("operation", "authorize") in labels)
    assert latency_count == sum(by_outcome.values())
    for psp in ("psp_a", "psp_b"):
        assert value(s, "gateway_psp_breaker_state", psp=psp) == 0  # closed
        assert ("gateway_psp_inflight_capacity_ratio", frozenset({("psp", psp)})) in s


def test_store_checks_report_a_balanced_ledger_and_an_empty_webhook_queue(traffic: Gateway) -> None:
    s = _wait_for(traffic, "value(s, 'gateway_ledger_last_check_timestamp_seconds') > 0"
                           " and value(s, 'gateway_operations_total', kind='capture', status='succeeded') == 12")
    s = _wait_for(traffic, f"value(s, 'gateway_ledger_last_check_timestamp_seconds') > "
                           f"{value(s, 'gateway_ledger_last_check_timestamp_seconds')}")
    assert value(s, "gateway_ledger_balanced") == 1
    assert value(s, "gateway_ledger_unbalanced_postings") == 0
    assert value(s, "gateway_ledger_imbalance_minor", currency="USD") == 0
    assert value(s, "gateway_webhook_oldest_undelivered_age_seconds") == 0
    assert value(s, "gateway_feed_lag_lsn") == 0
    assert value(s, "gateway_payments_pending_verification") == 0
    assert value(s, "gateway_disk_free_bytes") > 0


def test_the_metrics_text_passes_promtools_lint(traffic: Gateway) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (bash deploy/prometheus.sh install)")
    _wait_for(traffic, "value(s, 'gateway_operations_total', kind='capture', status='succeeded') == 12")
    text = httpx.get(f"{traffic.url}/metrics", timeout=10).text
    kinds = families(text)
    assert kinds["gateway_payment_ack_to_final_seconds"] == "histogram"
    assert kinds["gateway_webhook_deliveries_total"] == "counter"
    lint = subprocess.run([promtool, "check", "metrics"], check=False, input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_worker_childs_metrics_survive_its_restart(traffic: Gateway) -> None:
    """After the child is killed and started again, its metrics come back on the parent's /metrics."""
    from e2e.test_worker_child import _child_pid

    os.kill(_child_pid(traffic.data_dir), signal.SIGKILL)
    _wait_for(traffic, "value(s, 'gateway_worker_respawns_total') == 1")
    with httpx.Client(base_url=traffic.url, headers=auth(), timeout=10) as c:
        r = c.post("/v1/payments", json={"amount": 500, "currency": "USD", "payment_method": "tok_visa"})
        assert r.status_code == 201
    # A new child counts from zero: one authorization since the restart.
    _wait_for(traffic, "value(s, 'gateway_payments_final_total', status='authorized', decline_code='') == 1")
