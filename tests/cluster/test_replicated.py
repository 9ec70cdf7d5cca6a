"""`[cluster] durability = "replicated"` against three real brokers, under load, with SIGKILLs.

Two gateway processes (each with its WAL and relay), two workers and a PSP simulator; the topic has
three copies of each partition and `min.insync.replicas = 2`. Every WAL fsync of the gateways is held
back by `GATEWAY_FAULT_WAL_FSYNC_DELAY_MS` (a disk that stalls for a second each time), so a create
answered 2xx here was acknowledged by the brokers, not by the local disk. After each fault: every
acknowledged payment is stored exactly once, reaches a final status, and the ledger balances.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support import Gateway, auth

from .conftest import Brokers3, ServiceUrls, cluster_config
from .test_cluster_processing import FINAL, ProcessingCluster
from .traffic import BackgroundTraffic

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

FSYNC_DELAY_MS = 1000
BODY = {"amount": 1250, "currency": "EUR", "payment_method": "tok_visa", "capture": True}
SETTLE_TIMEOUT_S = 90.0


@dataclass
class Outcome:
    """What the clients saw: the payment id of every 2xx by idempotency key, and every status."""

    acked: dict[str, str] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0

    def record(self, key: str, r: httpx.Response) -> None:
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        if 200 <= r.status_code < 300:
            pid = r.json()["id"]
            assert self.acked.setdefault(key, pid) == pid, f"key {key} answered with two payments"


class Burst(BackgroundTraffic):
    """Distinct keys from `concurrency` lanes in a background thread until stopped; transport errors
    (a killed gateway) are counted, never retried."""

    def __init__(self, url: str, concurrency: int = 8) -> None:
        super().__init__(url, BODY, concurrency)
        self.outcome = Outcome()

    async def _lane(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            key = uuid.uuid4().hex
            r = await self._create(client, key)
            if r is None:
                self.outcome.errors += 1
                await asyncio.sleep(0.05)
                continue
            self.outcome.record(key, r)


class ReplicatedCluster(ProcessingCluster):
    def __init__(self, services: ServiceUrls, brokers: Brokers3, tmp: Path) -> None:
        svc = ServiceUrls(services.redis_url, services.database_url, brokers.bootstrap)
        super().__init__(svc, tmp, psp_time_scale=0.01)
        tag = self.topic.removeprefix("payments-")
        config_text = cluster_config(
            svc, self.schema, self.topic, f"workers-{tag}", self.prefix, "replicated",
            "topic_replication_factor = 3\ntopic_min_insync_replicas = 2\nrelay_message_timeout_ms = 120000\n")
        self.config_path.write_text(config_text)
        self.gateway = Gateway(tmp / "data", config_text,
                               extra_env={"GATEWAY_FAULT_WAL_FSYNC_DELAY_MS": str(FSYNC_DELAY_MS)})

    def restart_gateway_after_sigkill(self) -> None:
        self.gateway.kill()
        self.gateway.start(timeout_s=90)
        self._wait_both_processes()

    def acked_not_fsynced(self) -> int:
        """The most records one gateway process has had acknowledged by the brokers beyond its WAL's
        committed (fsynced) LSN, over a few scrapes (each a new connection, so both processes answer)."""
        most = 0
        for _ in range(6):
            with httpx.Client(timeout=5) as c:
                text = c.get(f"{self.gateway.url}/metrics").text
            acked = int(re.search(r"^gateway_relay_acked_lsn (\d+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
            committed = int(re.search(r"^gateway_wal_committed_lsn (\d+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
            most = max(most, acked - committed)
        return most

    def assert_stored_once_and_final(self, acked: dict[str, str]) -> None:
        """Every acknowledged payment is one row with the id its client saw, in a final status; no key
        has two payments; the ledger balances."""
        assert acked, "nothing was acknowledged"
        dup = self.query("SELECT idempotency_key, count(*) FROM payments GROUP BY idempotency_key HAVING count(*) > 1")
        assert dup == [], f"payments written twice: {dup[:5]}"
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            rows = dict(self.query("SELECT id, status FROM payments WHERE id = ANY(%s)", list(acked.values())))
            pending = [pid for pid in acked.values() if rows.get(pid) not in FINAL]
            if not pending:
                break
            assert time.monotonic() < deadline, (
                f"{len(pending)} acknowledged payments not stored in a final status, e.g. "
                f"{[(p, rows.get(p)) for p in pending[:3]]}\n{self.gateway.log()[-3000:]}\n{self.worker_logs()}")
            time.sleep(0.25)
        by_key = dict(self.query("SELECT idempotency_key, id FROM payments WHERE idempotency_key = ANY(%s)",
                                 list(acked)))
        assert by_key == acked
        self.assert_ledger_ok()


@pytest.fixture(scope="module")
def cl(services: ServiceUrls, brokers3: Brokers3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedCluster]:
    yield from ReplicatedCluster(services, brokers3, tmp_path_factory.mktemp("crepl")).serving()


def test_creates_are_acknowledged_before_their_fsync_and_survive_sigkill_of_the_gateway(
        cl: ReplicatedCluster) -> None:
    with Burst(cl.gateway.url) as burst:
        burst.wait_acked(100)
        # Acknowledged by the brokers while the stalled disk has not fsynced them: then SIGKILL.
        assert cl.acked_not_fsynced() > 0
        cl.restart_gateway_after_sigkill()
        burst.wait_acked(100)
    cl.assert_stored_once_and_final(burst.outcome.acked)


def test_one_broker_killed_mid_burst_then_restarted_loses_no_acknowledged_payment(
        cl: ReplicatedCluster, brokers3: Brokers3) -> None:
    try:
        with Burst(cl.gateway.url) as burst:
            burst.wait_acked(60)
            os.kill(brokers3.pid(2), signal.SIGKILL)
            burst.wait_acked(60)  # two of three brokers are a quorum: creates keep being acknowledged
            brokers3.start()
            burst.wait_acked(30)
    finally:
        brokers3.start()
    cl.assert_stored_once_and_final(burst.outcome.acked)


def test_without_a_quorum_creates_answer_503_with_retry_after_and_nothing_is_acknowledged(
        cl: ReplicatedCluster, brokers3: Brokers3) -> None:
    keys = [uuid.uuid4().hex for _ in range(16)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            return await asyncio.gather(*[
                client.post(f"{cl.gateway.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": k})
                for k in keys])

    try:
        for node in (2, 3):
            os.kill(brokers3.pid(node), signal.SIGKILL)
        answers = asyncio.run(send_all())
        assert [r.status_code for r in answers] == [503] * len(keys), [r.text for r in answers]
        assert all(r.headers.get("Retry-After") == "1" for r in answers)
        assert {r.json()["error"]["code"] for r in answers} == {"event_bus_unavailable"}
    finally:
        brokers3.start()
    # With the quorum back, a retry with the same key converges on one payment.
    acked: dict[str, str] = {}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while len(acked) < len(keys):
        assert time.monotonic() < deadline, f"retries not acknowledged: {len(acked)} of {len(keys)}"
        for k in keys:
            if k not in acked:
                r = httpx.post(f"{cl.gateway.url}/v1/payments", json=BODY,
                               headers={**auth(), "Idempotency-Key": k}, timeout=30)
                if r.status_code in (200, 201):
                    acked[k] = r.json()["id"]
    cl.assert_stored_once_and_final(acked)
