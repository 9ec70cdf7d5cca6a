"""The operators' artefacts agree with what the gateway exports: the Grafana dashboard's and the alert
rules' queries use only exported metric names, and docs/operations.md lists every metric and every
alert with its runbook line. The names come from a real gateway's /metrics (tests/metric_names.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml
from metric_names import BUILTIN, REPO, cluster_only_names, families, query_metric_names, series_names
from support import Gateway

DASHBOARD = REPO / "deploy/grafana/gateway.json"
ALERTS = REPO / "deploy/prometheus/alerts.yml"
OPERATIONS = REPO / "docs/operations.md"


@pytest.fixture(scope="module")
def exported(gateway: Gateway) -> tuple[set[str], set[str]]:
    """(families, every series name a query may select) of an embedded gateway plus cluster-only ones."""
    # The worker child reports its metrics once a second: wait until they are part of the text.
    deadline = time.monotonic() + 10
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    while "gateway_payments_final_total" not in text and time.monotonic() < deadline:
        time.sleep(0.1)
        text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    fams = set(families(text)) | cluster_only_names()
    series = series_names(text) | cluster_only_names() | BUILTIN
    assert "gateway_payments_final_total" in fams
    return fams, series


def _alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_the_dashboard_is_valid_json_whose_queries_use_only_exported_metrics(exported: tuple[set[str], set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "a dashboard without panels"
    unknown: dict[str, set[str]] = {}
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = query_metric_names(target["expr"])
            assert names, f"no metric in {target['expr']!r}"
            missing = names - exported[1]
            if missing:
                unknown[panel["title"]] = missing
    assert unknown == {}
    # What the issue asks the dashboard to show.
    for word in ("Throughput", "latency", "Settle rate", "Backlog", "PSP", "Webhook", "lag"):
        assert any(word.lower() in t.lower() for t in titles), word


def test_query_name_extraction_sees_through_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (psp, le) (rate(gateway_psp_request_seconds_bucket{operation="a"}'
            "[$__rate_interval]))) / on (psp) max(gateway_no_such_metric) > 2 * 3600")
    assert query_metric_names(expr) == {"gateway_psp_request_seconds_bucket", "gateway_no_such_metric"}


def test_alert_rules_use_only_exported_metrics(exported: tuple[set[str], set[str]]) -> None:
    unknown = {r["alert"]: query_metric_names(r["expr"]) - exported[1] for r in _alert_rules()}
    assert {k: v for k, v in unknown.items() if v} == {}


def test_operations_doc_lists_every_metric_and_every_alert_with_a_runbook_line(
        exported: tuple[set[str], set[str]]) -> None:
    doc = OPERATIONS.read_text()
    documented = set(re.findall(r"`(gateway_[a-z0-9_]+)`", doc))
    assert exported[0] - documented == set(), "metrics missing from docs/operations.md"
    assert documented - exported[0] == set(), "docs/operations.md lists metrics nothing exports"
    for rule in _alert_rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
        m = re.search(rf"^### {rule['alert']}\n+(.+)$", doc, re.MULTILINE)
        assert m is not None, f"no runbook section for {rule['alert']}"
        assert len(m.group(1)) > 40, f"runbook line of {rule['alert']} is too short"


def test_promtool_checks_the_rules_and_passes_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (bash deploy/prometheus.sh install; make test-alerts does it)")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(REPO / "deploy/prometheus/alerts_test.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
