"""The cluster heals itself: faults under load against one cluster at the shipped timeouts.

One module-scoped cluster (two gateway processes behind one port, two `gateway worker`s, one
`gateway psp-sim`; no timeout of the config overridden), paced traffic of creates with capture, and
one fault per test in the middle of a burst: none (the error budget), SIGKILL of one HTTP process,
SIGKILL of a worker, a Kafka broker restart (three times: the hang it caused was intermittent), Redis
down for 5 s, a PostgreSQL restart. After each, within a bound: every acknowledged payment is in
PostgreSQL with a final status and `GET` answers that status, no key made two payments, no payment was
authorized twice, the ledger balances.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from support import REPO, Gateway, auth

from .conftest import ServiceUrls
from .test_cluster_processing import ProcessingCluster
from .traffic import BackgroundTraffic

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

BODY = {"amount": 1250, "currency": "EUR", "payment_method": "tok_visa", "capture": True}
FINAL = ("captured", "failed", "canceled", "refunded")
# Offered creates per second (paced, over LANES concurrent clients) and the acknowledgements a burst
# collects before and after its fault.
# The rate stays below what the workers settle on a loaded 2-core machine (about 30-60/s), so that the
# time to settle measures the fault's effect, not a backlog.
RATE_PER_S = 30
LANES = 3
ACKS_AROUND_FAULT = 45
SETTLE_TIMEOUT_S = 120.0
# A broker restart takes about 30 s here, and creates are acknowledged from the WAL meanwhile.
BROKER_RESTART_RATE_PER_S = 5
ERROR_BUDGET = 0.005
READ_CONNECTIONS = 8
NO_FAULT_RATE_PER_S = 200
NO_FAULT_LANES = 8
NO_FAULT_ACKS = 600
REDIS_DOWN_S = 5
BROKER_RESTARTS = 3
DEPLOY = REPO / "deploy"


@dataclass
class Outcome:
    acked: dict[str, str] = field(default_factory=dict)  # idempotency key -> payment id
    ids_by_key: dict[str, set[str]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + self.transport_errors

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500) + self.transport_errors


class PacedBurst(BackgroundTraffic):
    """Creates with distinct keys at about RATE_PER_S until stopped; transport errors are counted."""

    def __init__(self, url: str, rate_per_s: float = RATE_PER_S, lanes: int = LANES) -> None:
        super().__init__(url, BODY, lanes)
        self.rate_per_s = rate_per_s
        self.outcome = Outcome()

    async def _lane(self, client: httpx.AsyncClient) -> None:
        period_s = self.lanes / self.rate_per_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            key = uuid.uuid4().hex
            r = await self._create(client, key)
            if r is None:
                self.outcome.transport_errors += 1
            else:
                o = self.outcome
                o.statuses[r.status_code] = o.statuses.get(r.status_code, 0) + 1
                if 200 <= r.status_code < 300:
                    pid = r.json()["id"]
                    o.acked[key] = pid
                    o.ids_by_key.setdefault(key, set()).add(pid)
            next_at += period_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def progress(self) -> object:
        return self.outcome.statuses


class FaultCluster(ProcessingCluster):
    """The processing cluster at the shipped timeouts (the shared test config shortens Redis's)."""

    def __init__(self, services: ServiceUrls, tmp: Path) -> None:
        super().__init__(services, tmp, psp_time_scale=0.01)
        text = re.sub(r"(?m)^redis_timeout_ms = \d+\n", "", self.config_path.read_text())
        self.config_path.write_text(text)
        self.gateway = Gateway(tmp / "data", text)

    def worker_logs(self) -> str:
        """The workers' own log lines (not httpx's per-call lines nor librdkafka's), last ones first."""
        out = []
        for i in range(len(self.workers)):
            lines = (self.tmp / f"worker-{i}.log").read_text(errors="replace").splitlines()
            mine = [ln for ln in lines if " gateway." in ln or "Traceback" in ln or "Error" in ln]
            out.append(f"-- worker-{i}:\n" + "\n".join(mine[-15:]))
        return "\n".join(out)

    def http_processes(self) -> list[int]:
        """Pids of granian's HTTP worker processes (the children of `gateway serve`)."""
        assert self.gateway.proc is not None
        parent = self.gateway.proc.pid
        children: list[int] = []
        for task in Path(f"/proc/{parent}/task").iterdir():
            children += [int(p) for p in (task / "children").read_text().split()]
        return [p for p in children if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]

    def wait_slots(self, timeout_s: float = 60) -> set[str]:
        self._wait_both_processes(timeout_s)
        return {"0", "1"}

    def settle(self, outcome: Outcome, timeout_s: float = SETTLE_TIMEOUT_S) -> dict[str, str]:
        """Waits until every acknowledged payment is final in PostgreSQL; returns {id: status}."""
        ids = list(outcome.acked.values())
        assert ids, outcome.statuses
        deadline = time.monotonic() + timeout_s
        while True:
            rows = dict(self.query("SELECT id, status FROM payments WHERE id = ANY(%s)", ids))
            if len(rows) == len(ids) and all(s in FINAL for s in rows.values()):
                return rows
            if time.monotonic() >= deadline:
                open_ = {s: sum(1 for v in rows.values() if v == s) for s in set(rows.values()) if s not in FINAL}
                raise AssertionError(
                    f"{len(ids) - len(rows)} acknowledged payments not stored, not final {open_} after {timeout_s}s,"
                    f" e.g. {[p for p, s in rows.items() if s not in FINAL][:3]}\n{self.worker_logs()}")
            time.sleep(0.25)

    def assert_healed(self, outcome: Outcome) -> dict[str, str]:
        rows = self.settle(outcome)
        assert all(len(ids) == 1 for ids in outcome.ids_by_key.values()), "one key answered with two payment ids"
        keys = list(outcome.acked)
        dup = self.query("SELECT idempotency_key, count(*) FROM payments WHERE idempotency_key = ANY(%s)"
                         " GROUP BY idempotency_key HAVING count(*) > 1", keys)
        assert dup == [], f"payments written twice: {dup[:5]}"
        stored = dict(self.query("SELECT idempotency_key, id FROM payments WHERE idempotency_key = ANY(%s)", keys))
        assert stored == outcome.acked, "every acknowledged key holds the acknowledged payment"
        approved = self.query("SELECT payment_id, count(*) FROM payment_attempts WHERE operation = 'authorize'"
                              " AND status = 'approved' AND payment_id = ANY(%s) GROUP BY payment_id"
                              " HAVING count(*) > 1", list(rows))
        assert approved == [], f"authorized twice: {approved[:5]}"
        # Readable with the final status, through either gateway process (new connections, several at once).
        asyncio.run(self._assert_reads(rows))
        self.assert_ledger_ok()
        return rows


    async def _assert_reads(self, rows: dict[str, str]) -> None:
        todo = list(rows.items())
        wrong: list[tuple[str, str, int, str]] = []

        async def reader() -> None:
            # A new connection per read (no keep-alive), so both gateway processes answer.
            async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as c:
                while todo:
                    pid, status = todo.pop()
                    r = await c.get(f"{self.gateway.url}/v1/payments/{pid}", headers=auth())
                    if r.status_code != 200 or r.json()["status"] != status:
                        wrong.append((pid, status, r.status_code, r.text[:200]))

        await asyncio.gather(*[reader() for _ in range(READ_CONNECTIONS)])
        assert wrong == [], f"{len(wrong)} reads disagree with PostgreSQL, e.g. {wrong[:3]}"


def service(name: str, action: str) -> None:
    subprocess.run(["bash", str(DEPLOY / f"{name}.sh"), action], check=True, timeout=180, capture_output=True)


@pytest.fixture(scope="module")
def fc(services: ServiceUrls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    yield from FaultCluster(services, tmp_path_factory.mktemp("faults")).serving()


def under_load(fc: FaultCluster, fault: Callable[[PacedBurst], None]) -> Outcome:
    with PacedBurst(fc.gateway.url) as burst:
        burst.wait_acked(ACKS_AROUND_FAULT)
        fault(burst)
        burst.wait_acked(ACKS_AROUND_FAULT)
    return burst.outcome


# -- no fault: the shipped timeouts hold on a loaded machine -----------------------------------------


def test_no_fault_at_the_shipped_timeouts_stays_within_the_error_budget(fc: FaultCluster) -> None:
    # The rate at which the 200 ms Redis timeout of old refused 0.8% of creates on this machine.
    with PacedBurst(fc.gateway.url, rate_per_s=NO_FAULT_RATE_PER_S, lanes=NO_FAULT_LANES) as burst:
        burst.wait_acked(NO_FAULT_ACKS)
    out = burst.outcome
    assert out.failed <= ERROR_BUDGET * out.sent, (out.statuses, out.transport_errors)
    fc.assert_healed(out)


# -- faults ----------------------------------------------------------------------------------------


def test_sigkill_of_one_http_process_keeps_the_port_serving_and_its_slot_is_taken_over(fc: FaultCluster) -> None:
    before = fc.http_processes()
    assert len(before) == 2, before
    answered_at_kill: list[int] = []

    def kill_one(burst: PacedBurst) -> None:
        answered_at_kill.append(len(burst.outcome.acked))
        os.kill(before[0], signal.SIGKILL)

    out = under_load(fc, kill_one)
    assert fc.gateway.proc is not None and fc.gateway.proc.poll() is None, "gateway serve exited:\n" + fc.gateway.log()[-3000:]
    assert len(out.acked) >= answered_at_kill[0] + ACKS_AROUND_FAULT, "the port kept answering after the kill"
    after = fc.http_processes()
    assert len(after) == 2 and before[0] not in after, (before, after)
    fc.wait_slots()  # the new process claimed the dead one's WAL slot: both slots answer again
    fc.assert_healed(out)


def test_sigkill_of_a_worker_then_a_new_worker(fc: FaultCluster) -> None:
    def kill_worker(_burst: PacedBurst) -> None:
        victim = next(w for w in fc.workers if w.poll() is None)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        fc.start_worker()

    fc.assert_healed(under_load(fc, kill_worker))


@pytest.mark.timeout(BROKER_RESTARTS * 200)  # a broker start alone took 30-60 s on this loaded machine
def test_kafka_broker_restarted_three_times_never_hangs_a_worker(fc: FaultCluster) -> None:
    # The hang was intermittent: three restarts in a row under one burst, each followed by its check
    # (every payment acknowledged so far final and readable) while the load goes on.
    with PacedBurst(fc.gateway.url, rate_per_s=BROKER_RESTART_RATE_PER_S, lanes=2) as burst:
        burst.wait_acked(ACKS_AROUND_FAULT // 3)
        checked: set[str] = set()
        for _ in range(BROKER_RESTARTS):
            try:
                service("kafka", "stop")
            finally:
                service("kafka", "start")
            burst.wait_acked(ACKS_AROUND_FAULT // 3)
            o = burst.outcome
            acked = dict(o.acked)
            fresh = {k: v for k, v in acked.items() if k not in checked}
            fc.assert_healed(Outcome(fresh, {k: set(o.ids_by_key[k]) for k in fresh}))
            checked.update(fresh)
            assert all(w.poll() is None for w in fc.workers[-2:]), "a worker exited: " + fc.worker_logs()


def test_redis_down_for_5_s_then_no_stale_read(fc: FaultCluster) -> None:
    def redis_down(_burst: PacedBurst) -> None:
        try:
            service("redis", "stop")
            time.sleep(REDIS_DOWN_S)
        finally:
            service("redis", "start")

    out = under_load(fc, redis_down)
    assert out.statuses.get(503, 0) + out.transport_errors > 0, ("no refusal while Redis was down", out.statuses)
    assert set(out.statuses) <= {201, 503}, out.statuses
    fc.assert_healed(out)


def test_postgres_restart(fc: FaultCluster) -> None:
    def restart(_burst: PacedBurst) -> None:
        try:
            service("postgres", "stop")
        finally:
            service("postgres", "start")

    fc.assert_healed(under_load(fc, restart))


def test_a_read_your_writes_copy_left_behind_never_hides_the_stored_status(fc: FaultCluster) -> None:
    """What a worker killed between its PostgreSQL commit and its Redis delete leaves (and a delete
    lost while Redis was down): the gateway's `processing` copy of a payment that is final since."""
    out = under_load(fc, lambda burst: None)
    rows = fc.settle(out)
    merchants = fc.query("SELECT DISTINCT merchant_id FROM payments WHERE id = ANY(%s)", list(rows))
    assert len(merchants) == 1, merchants
    merchant = str(merchants[0][0]).encode()
    r = redis.Redis.from_url(fc.services.redis_url)
    try:
        for pid in rows:  # as the gateway writes them: merchant id, newline, the accepted body
            r.set(f"{fc.prefix}:pay:{pid}", merchant + b'\n{"id":"%s","status":"processing"}' % pid.encode(), ex=3600)
        # Each copy is there, and would be served if reads trusted it first.
        assert all(r.exists(f"{fc.prefix}:pay:{pid}") for pid in rows)
    finally:
        r.close()
    fc.assert_healed(out)
