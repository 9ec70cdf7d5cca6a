"""Cluster mode's backlog bound (runtime/backlog.py): with no worker running, accepted payments pile up
in Kafka; at `[worker] backlog_max` creates answer 503 `backlog_full` with Retry-After and write nothing;
once a worker drains the backlog the same request is accepted."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest
from support import Gateway

from .test_cluster_mode import Cluster, Outcome, cluster_factory, post  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

BACKLOG_MAX = 100
CHECK_MS = 200
CREATES_MAX = 1000


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    m = re.search(rf"^{name} (-?[0-9.]+)$", text, re.MULTILINE)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


def test_creates_answer_503_at_the_backlog_bound_and_are_accepted_again_once_workers_drain(cluster_factory) -> None:  # noqa: F811
    cl: Cluster = cluster_factory()
    cl.config_text += f"backlog_check_ms = {CHECK_MS}\n[worker]\nbacklog_max = {BACKLOG_MAX}\n[psp]\ntime_scale = 0.01\n"
    cl.config_path.write_text(cl.config_text)
    cl.gateway = Gateway(cl.tmp / "data", cl.config_text)
    cl.start_gateway()
    outcome = Outcome()
    refused: httpx.Response | None = None
    refused_key = ""
    for _ in range(CREATES_MAX):
        key = uuid.uuid4().hex
        r = post(cl.gateway.url, key)
        if r.status_code == 503:
            refused, refused_key = r, key
            break
        assert r.status_code == 201, r.text
        outcome.record(key, r)
        time.sleep(0.005)
    assert refused is not None, f"{CREATES_MAX} creates and never refused at backlog_max = {BACKLOG_MAX}"
    # The figure is measured every backlog_check_ms, so the bound may be passed by what one interval accepts.
    assert len(outcome.acked) >= BACKLOG_MAX
    error = refused.json()["error"]
    assert error["code"] == "backlog_full" and refused.headers["Retry-After"] == "1"
    # Each process measures on its own: within one check interval the other may still be below the
    # bound. Past it, refused means refused everywhere (the backlog only grows with no worker), and
    # nothing was written.
    time.sleep(3 * CHECK_MS / 1000)
    again = [post(cl.gateway.url, refused_key) for _ in range(4)]
    assert {r.status_code for r in again} == {503}
    assert _metric(cl.gateway.url, "gateway_backlog_payments") >= BACKLOG_MAX
    cl.start_worker()
    cl.assert_each_key_once(outcome)
    # Once the worker has stored and settled what was accepted, the backlog falls and the key is accepted.
    deadline = time.monotonic() + 60
    while True:
        r = post(cl.gateway.url, refused_key)
        if r.status_code == 201:
            break
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.2)
    outcome.record(refused_key, r)
    cl.assert_each_key_once(outcome)
    assert cl.query("SELECT count(*) FROM payments WHERE idempotency_key = %s", refused_key) == [(1,)]
    refusals = sum(_metric(cl.gateway.url, "gateway_backlog_refused_total") for _ in range(6))
    assert refusals >= 1  # (each scrape reaches one of the two processes)
