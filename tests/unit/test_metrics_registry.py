"""The async path's metric registry (gateway.domain.metrics) and the worker's metric hooks: the text
follows the Prometheus exposition format, label sets are bounded, and the PSP bulkhead reports calls."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from gateway.domain.metrics import SERIES_MAX, Registry
from gateway.logs import REQUEST_ID, JsonFormatter
from gateway.processing.metrics import PipelineMetrics
from gateway.processing.settings import WorkerSettings, build_psps


def test_counters_gauges_and_histograms_render_the_exposition_format() -> None:
    r = Registry()
    c = r.counter("gateway_things_total", "Things.", ("kind",))
    c.inc(("a",))
    c.inc(("a",), 2)
    c.inc(('b"\\',))
    r.gauge("gateway_level", "Level.", (), lambda: [((), 0.5)])
    h = r.histogram("gateway_wait_seconds", "Wait.", (), bounds=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    lines = r.render().splitlines()
    assert "# TYPE gateway_things_total counter" in lines
    assert 'gateway_things_total{kind="a"} 3' in lines
    assert 'gateway_things_total{kind="b\\"\\\\"} 1' in lines
    assert "gateway_level 0.5" in lines
    assert [ln for ln in lines if ln.startswith("gateway_wait_seconds_bucket")] == [
        'gateway_wait_seconds_bucket{le="0.1"} 1', 'gateway_wait_seconds_bucket{le="1.0"} 2',
        'gateway_wait_seconds_bucket{le="+Inf"} 3']
    assert "gateway_wait_seconds_count 3" in lines and "gateway_wait_seconds_sum 5.55" in lines


def test_label_sets_past_the_bound_are_counted_under_other() -> None:
    c = Registry().counter("gateway_codes_total", "Codes.", ("code",))
    for i in range(SERIES_MAX + 10):
        c.inc((f"c{i}",))
    assert len(c.values) == SERIES_MAX + 1
    assert c.value(("_other",)) == 10


def test_the_bulkhead_reports_every_psp_call_and_breakers_are_read_at_render_time() -> None:
    metrics = PipelineMetrics()
    psps = build_psps(WorkerSettings(psp_time_scale=0.0, psps=("psp_a",)), observer=metrics)
    metrics.bind(psps.router, psps.bulkheads, lambda: 7)
    client = psps.clients["psp_a"]

    async def calls() -> None:
        await client.authorize(reference="pay_1", amount=100, currency="USD", token="tok_visa", idempotency_key="k1")
        await client.authorize(reference="pay_2", amount=100, currency="USD", token="tok_decline_stolen",
                               idempotency_key="k2")
        await client.status(idempotency_key="k1")

    asyncio.run(calls())
    assert metrics.psp_requests.value(("psp_a", "authorize", "approved")) == 1
    assert metrics.psp_requests.value(("psp_a", "authorize", "hard_decline")) == 1
    assert metrics.psp_requests.value(("psp_a", "status", "found")) == 1
    assert metrics.psp_latency.count(("psp_a", "authorize")) == 2
    for _ in range(5):
        psps.router.breakers["psp_a"].record(False)
    text = metrics.registry.render()
    assert 'gateway_psp_breaker_state{psp="psp_a"} 2' in text
    assert "gateway_worker_backlog_items 7" in text


def test_json_log_lines_carry_the_request_id_and_mask_card_numbers_in_tracebacks() -> None:
    fmt = JsonFormatter()
    try:
        raise ValueError("card 4242 4242 4242 4242 refused")
    except ValueError:
        record = logging.LogRecord("gateway.api", logging.ERROR, __file__, 1, "key %s", ("sk_live_abcdefgh",),
                                   sys.exc_info())
    token = REQUEST_ID.set("req_1")
    try:
        line = fmt.format(record)
    finally:
        REQUEST_ID.reset(token)
    out = json.loads(line)
    assert out["request_id"] == "req_1" and out["level"] == "error"
    assert "sk_live_abcdefgh" not in line and "4242 4242 4242 4242" not in line
    assert "ValueError" in out["exception"]
