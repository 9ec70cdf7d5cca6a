"""Cluster mode against the real Redis, Kafka and PostgreSQL: two gateway processes behind one port
(`server.workers = 2`), two `gateway worker` processes, and faults in the middle of bursts.

Every test has its own PostgreSQL schema, Kafka topic, consumer group and Redis key prefix, so tests do
not see each other's data; all of them are dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient
from support import GATEWAY, REPO, Gateway, auth, same_payment, stop_process

from .conftest import ServiceUrls, cluster_config
from .traffic import BackgroundTraffic

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

BODY = {"amount": 1250, "currency": "EUR", "payment_method": "tok_visa"}
DRAIN_TIMEOUT_S = 60.0


@dataclass
class Outcome:
    """What the clients saw: every 2xx payment id by idempotency key, and the other statuses."""

    acked: dict[str, str] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    ids_by_key: dict[str, set[str]] = field(default_factory=dict)
    errors: int = 0

    def record(self, key: str, r: httpx.Response) -> None:
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        if 200 <= r.status_code < 300:
            pid = r.json()["id"]
            self.acked[key] = pid
            self.ids_by_key.setdefault(key, set()).add(pid)


class Cluster:
    def __init__(self, services: ServiceUrls, tmp: Path, durability: str, message_timeout_ms: int) -> None:
        tag = uuid.uuid4().hex[:10]
        self.services = services
        self.schema = f"cl_{tag}"
        self.topic = f"payments-{tag}"
        self.prefix = f"t{tag}"
        self.tmp = tmp
        self.config_text = cluster_config(services, self.schema, self.topic, f"workers-{tag}", self.prefix,
                                          durability, f"relay_message_timeout_ms = {message_timeout_ms}\n")
        self.config_path = tmp / "cluster.toml"
        self.config_path.write_text(self.config_text)
        self.gateway = Gateway(tmp / "data", self.config_text)
        self.tag = tag
        self.workers: list[subprocess.Popen[bytes]] = []

    # -- processes -------------------------------------------------------------------------------

    def start_gateway(self) -> None:
        self.gateway.start(timeout_s=90)
        self.wait_both_processes()

    def wait_both_processes(self, timeout_s: float = 60) -> None:
        """Both granian workers answer (each reports its WAL slot in /metrics)."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"only slots {seen} answered:\n{self.gateway.log()[-3000:]}"
            try:
                with httpx.Client(timeout=2) as c:  # a new connection each time, so both get a turn
                    text = c.get(f"{self.gateway.url}/metrics").text
                seen.update(re.findall(r"^gateway_cluster_slot (\d+)$", text, re.MULTILINE))
            except httpx.HTTPError:
                time.sleep(0.05)

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker-{len(self.workers)}.log").open("ab")
        proc = subprocess.Popen([GATEWAY, "worker", "--config", str(self.config_path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        self.gateway.stop()
        for w in self.workers:
            if w.poll() is None:
                stop_process(w)

    def cleanup(self) -> None:
        with psycopg.connect(self.services.database_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        admin = AdminClient({"bootstrap.servers": self.services.kafka_bootstrap})
        with contextlib.suppress(Exception):  # the topic may not exist if the test failed early
            admin.delete_topics([self.topic])[self.topic].result(timeout=30)
        r = redis.Redis.from_url(self.services.redis_url)
        try:
            keys = list(r.scan_iter(f"{self.prefix}:*", count=1000))
            if keys:
                r.delete(*keys)
        except redis.RedisError:
            pass
        finally:
            r.close()

    # -- PostgreSQL ------------------------------------------------------------------------------

    def query(self, sql: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.services.database_url, autocommit=True) as conn:
            conn.execute(f"SET search_path = {self.schema}")
            return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]

    def wait_in_postgres(self, ids: set[str], timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        missing = set(ids)
        while missing:
            rows = self.query("SELECT id FROM payments WHERE id = ANY(%s)", list(missing))
            missing -= {r[0] for r in rows}
            if not missing:
                return
            assert time.monotonic() < deadline, (
                f"{len(missing)} acknowledged payments never reached PostgreSQL, e.g. {sorted(missing)[:3]}\n"
                f"{self.gateway.log()[-3000:]}")
            time.sleep(0.25)

    def assert_each_key_once(self, outcome: Outcome) -> None:
        dup = self.query("SELECT idempotency_key, count(*) FROM payments GROUP BY idempotency_key"
                         " HAVING count(*) > 1")
        assert dup == [], f"payments written twice: {dup[:5]}"
        self.wait_in_postgres(set(outcome.acked.values()))
        for key, pid in outcome.acked.items():
            rows = self.query("SELECT id FROM payments WHERE idempotency_key = %s", key)
            assert rows == [(pid,)], (key, pid, rows)


@pytest.fixture
def cluster_factory(services: ServiceUrls, tmp_path: Path) -> Iterator[object]:
    made: list[Cluster] = []

    def make(durability: str = "wal", message_timeout_ms: int = 120_000) -> Cluster:
        c = Cluster(services, tmp_path / f"c{len(made)}", durability, message_timeout_ms)
        made.append(c)
        return c

    for d in ("c0", "c1"):
        (tmp_path / d).mkdir()
    yield make
    for c in made:
        c.stop()
        c.cleanup()


class Burst(BackgroundTraffic):
    """Open-ended traffic in a background thread: distinct keys (each sent `copies` times at once)
    until stopped; transport errors (a killed process) are counted, never retried."""

    ack_timeout_s = 30

    def __init__(self, url: str, concurrency: int = 8, copies: int = 1) -> None:
        super().__init__(url, BODY, concurrency, connections_per_lane=copies)
        self.copies = copies
        self.outcome = Outcome()

    async def _one(self, client: httpx.AsyncClient, key: str) -> None:
        r = await self._create(client, key)
        if r is None:
            self.outcome.errors += 1
            return
        self.outcome.record(key, r)

    async def _lane(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            key = uuid.uuid4().hex
            await asyncio.gather(*[self._one(client, key) for _ in range(self.copies)])


def post(url: str, key: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/payments", json=body or BODY, headers={**auth(), "Idempotency-Key": key},
                      timeout=15)


# -- tests -----------------------------------------------------------------------------------------


def test_fifty_concurrent_same_key_requests_over_two_processes_create_one_payment(cluster_factory) -> None:
    cl = cluster_factory()
    cl.start_gateway()
    cl.start_worker()
    key = uuid.uuid4().hex

    async def burst() -> list[httpx.Response]:
        # No keep-alive: every request is a new connection, so the kernel spreads them over both processes.
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=20, limits=limits) as c:
            return await asyncio.gather(*[
                c.post(f"{cl.gateway.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": key})
                for _ in range(50)])

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 409}, statuses
    ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 1
    # Once the first has finished, every retry on any process replays it; other parameters are refused.
    for _ in range(6):
        again = post(cl.gateway.url, key)
        assert again.status_code == 201 and again.json()["id"] in ids
        assert again.headers["idempotent-replayed"] == "true"
    assert post(cl.gateway.url, key, {**BODY, "amount": 99}).json()["error"]["type"] == "idempotency_error"
    cl.wait_in_postgres(ids)
    assert cl.query("SELECT count(*) FROM payments WHERE idempotency_key = %s", key) == [(1,)]


def test_reads_see_writes_across_processes_before_and_after_the_worker(cluster_factory) -> None:
    cl = cluster_factory()
    cl.start_gateway()
    created = [post(cl.gateway.url, uuid.uuid4().hex).json() for _ in range(10)]
    # No worker yet: the payments are only in the WALs, Kafka and Redis; every GET (new connection,
    # so either process) finds them.
    for p in created:
        r = httpx.get(f"{cl.gateway.url}/v1/payments/{p['id']}", headers=auth(), timeout=5)
        assert r.status_code == 200 and r.json() == p
    cl.start_worker()
    cl.wait_in_postgres({p["id"] for p in created})
    r = redis.Redis.from_url(cl.services.redis_url)
    deadline = time.monotonic() + 10
    while any(r.exists(f"{cl.prefix}:pay:{p['id']}") for p in created):
        assert time.monotonic() < deadline, "the worker did not drop the read-your-writes copies"
        time.sleep(0.1)
    r.close()
    for p in created:  # now served by PostgreSQL, as the worker has taken it since (status, amounts)
        got = httpx.get(f"{cl.gateway.url}/v1/payments/{p['id']}", headers=auth(), timeout=5)
        assert got.status_code == 200 and same_payment(got.json(), p)


def test_acknowledged_payments_reach_postgres_once_after_sigkill_of_the_gateway(cluster_factory) -> None:
    # durability = "kafka": a 2xx also waits for the broker's ack.
    cl = cluster_factory("kafka")
    cl.start_gateway()
    cl.start_worker()
    cl.start_worker()
    with Burst(cl.gateway.url) as burst:
        burst.wait_acked(100)
        cl.gateway.kill()  # both gateway processes, mid-burst
        cl.start_gateway()  # the restarted processes claim the slots again and their relays resume
        burst.wait_acked(100)
    assert burst.outcome.acked
    cl.assert_each_key_once(burst.outcome)


def test_acknowledged_payments_reach_postgres_once_after_sigkill_of_a_worker(cluster_factory) -> None:
    cl = cluster_factory()
    cl.start_gateway()
    victim = cl.start_worker()
    cl.start_worker()
    with Burst(cl.gateway.url) as burst:
        burst.wait_acked(150)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        burst.wait_acked(150)
        cl.start_worker()
        burst.wait_acked(50)
    cl.assert_each_key_once(burst.outcome)


def test_acknowledged_payments_reach_postgres_once_across_a_kafka_broker_restart(cluster_factory) -> None:
    # A message timeout shorter than the outage: librdkafka gives up on records and the relays rewind
    # to their acked checkpoints and send again (the path a long outage takes).
    cl = cluster_factory(message_timeout_ms=2_000)
    cl.start_gateway()
    cl.start_worker()
    cl.start_worker()
    try:
        with Burst(cl.gateway.url) as burst:
            burst.wait_acked(100)
            subprocess.run(["bash", str(REPO / "deploy" / "kafka.sh"), "stop"], check=True, timeout=120)
            # durability = "wal": creates keep being acknowledged from the local WAL while the broker is away.
            burst.wait_acked(50)
            subprocess.run(["bash", str(REPO / "deploy" / "kafka.sh"), "start"], check=True, timeout=180)
            burst.wait_acked(50)
    finally:
        subprocess.run(["bash", str(REPO / "deploy" / "kafka.sh"), "start"], check=False, timeout=180)
    cl.assert_each_key_once(burst.outcome)
    assert "the relay rewinds to lsn" in cl.gateway.log()


def test_a_worker_started_while_kafka_is_away_waits_for_it_then_drains(cluster_factory) -> None:
    cl = cluster_factory()
    cl.start_gateway()
    try:
        with Burst(cl.gateway.url) as burst:
            burst.wait_acked(50)
            subprocess.run(["bash", str(REPO / "deploy" / "kafka.sh"), "stop"], check=True, timeout=120)
            worker = cl.start_worker()
            log = cl.tmp / "worker-0.log"
            deadline = time.monotonic() + 60
            # More than one attempt to reach Kafka: the worker neither exits nor gives up.
            while log.read_text(errors="replace").count("not reachable to check topic") < 2:
                assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.5)
            subprocess.run(["bash", str(REPO / "deploy" / "kafka.sh"), "start"], check=True, timeout=180)
            burst.wait_acked(50)
    finally:
        subprocess.run(["bash", str(REPO / "deploy" / "kafka.sh"), "start"], check=False, timeout=180)
    assert worker.poll() is None
    cl.assert_each_key_once(burst.outcome)


def test_keys_hold_after_redis_restarts_empty(cluster_factory, services: ServiceUrls) -> None:
    """Redis is a cache in front of PostgreSQL's record of every key: restarted without its data, the
    same key replays (same body), is refused (other body) and never makes a second payment."""
    cl = cluster_factory()
    cl.start_gateway()
    cl.start_worker()
    keys = [uuid.uuid4().hex for _ in range(2)]
    first = {k: post(cl.gateway.url, k) for k in keys}
    assert all(r.status_code == 201 for r in first.values())
    ids = {k: r.json()["id"] for k, r in first.items()}
    cl.wait_in_postgres(set(ids.values()))
    try:
        subprocess.run(["bash", str(REPO / "deploy" / "redis.sh"), "stop"], check=True, timeout=60)
        subprocess.run(["bash", str(REPO / "deploy" / "redis.sh"), "start"], check=True, timeout=60)
    finally:
        subprocess.run(["bash", str(REPO / "deploy" / "redis.sh"), "start"], check=False, timeout=60)
    redis.Redis.from_url(services.redis_url).flushall()  # whatever the restart kept: empty now
    deadline = time.monotonic() + 30

    def past_503(*body: dict[str, object]) -> httpx.Response:
        # The pooled connections broke with the restart: 503 (nothing written) until they are renewed,
        # in each of the cluster's HTTP processes (a request may reach either).
        while (r := post(cl.gateway.url, keys[0], *body)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        return r

    other = past_503({**BODY, "amount": 5555})
    assert other.status_code == 400 and other.json()["error"]["code"] == "idempotency_key_reused", other.text
    again = past_503()
    assert again.status_code == 201 and again.json()["id"] == ids[keys[0]], again.text
    assert again.headers["idempotent-replayed"] == "true" and again.json()["amount"] == BODY["amount"]

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=20, limits=limits) as c:
            return await asyncio.gather(*[
                c.post(f"{cl.gateway.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": keys[1]})
                for _ in range(50)])

    answers = asyncio.run(burst())
    statuses = [r.status_code for r in answers]
    # 503: a process whose pooled Redis connections the restart broke refused before writing anything.
    assert set(statuses) <= {201, 409, 503} and 201 in statuses, statuses
    assert {r.json()["id"] for r in answers if r.status_code == 201} == {ids[keys[1]]}
    replay = post(cl.gateway.url, keys[1])
    assert replay.status_code == 201 and replay.json()["id"] == ids[keys[1]]
    time.sleep(1)  # anything a duplicate would have written has reached PostgreSQL by now
    for k in keys:
        assert cl.query("SELECT amount FROM payments WHERE idempotency_key = %s", k) == [(BODY["amount"],)]
    # Each process counts its own lookups; new connections reach both.
    lookups = [re.search(r"^gateway_idempotency_durable_lookups_total (\d+)$",
                         httpx.get(f"{cl.gateway.url}/metrics", timeout=5, headers={"Connection": "close"}).text,
                         re.MULTILINE) for _ in range(10)]
    assert any(m is not None and int(m.group(1)) > 0 for m in lookups), "answered from PostgreSQL"


def test_redis_stopped_mid_burst_never_produces_a_duplicate(cluster_factory) -> None:
    cl = cluster_factory()
    cl.start_gateway()
    cl.start_worker()
    try:
        # Every key is sent three times at once, so the outage hits keys whose copies race each other.
        with Burst(cl.gateway.url, concurrency=6, copies=3) as burst:
            burst.wait_acked(60)
            subprocess.run(["bash", str(REPO / "deploy" / "redis.sh"), "stop"], check=True, timeout=60)
            time.sleep(2)
            during = dict(burst.outcome.statuses)
            time.sleep(1)
            assert burst.outcome.statuses.get(503, 0) > during.get(503, 0) or during.get(503, 0) > 0, (
                "no 503 while Redis was down", burst.outcome.statuses)
            subprocess.run(["bash", str(REPO / "deploy" / "redis.sh"), "start"], check=True, timeout=60)
            burst.wait_acked(60)
    finally:
        subprocess.run(["bash", str(REPO / "deploy" / "redis.sh"), "start"], check=False, timeout=60)
    out = burst.outcome
    assert set(out.statuses) <= {201, 409, 503}, out.statuses
    assert all(len(ids) == 1 for ids in out.ids_by_key.values()), "one key answered with two payment ids"
    cl.assert_each_key_once(out)


def test_risk_channel_delivers_to_every_gateway_process(cluster_factory) -> None:
    cl = cluster_factory()
    cl.start_gateway()
    r = redis.Redis.from_url(cl.services.redis_url)
    pids: set[str] = set()
    deadline = time.monotonic() + 20
    try:
        # The subscriber threads may still be connecting right after start-up: publish until both
        # processes (told apart by pid in the log) have received an update.
        while len(pids) < 2:
            assert time.monotonic() < deadline, cl.gateway.log()[-2000:]
            r.publish("gateway:risk", b'{"kind": "blocklist", "version": 7}')
            time.sleep(0.2)
            pids = set(re.findall(r"risk update received on gateway:risk by pid (\d+)", cl.gateway.log()))
    finally:
        r.close()


def test_db_migrate_creates_the_schema_once_and_reports_its_version(cluster_factory) -> None:
    cl = cluster_factory()
    first = subprocess.run([GATEWAY, "db", "migrate", "--config", str(cl.config_path)], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    again = subprocess.run([GATEWAY, "db", "migrate", "--config", str(cl.config_path)], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    version = int(re.search(r"schema version (\d+)", first).group(1))  # type: ignore[union-attr]
    assert version >= 2 and again == first
    assert cl.query("SELECT max(version) FROM schema_version") == [(version,)]
    # The constraints that back the API's promises are in place.
    cons = {r[0] for r in cl.query(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
        " JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s AND t.relname = 'payments'",
        cl.schema)}
    assert "UNIQUE (merchant_id, idempotency_key)" in cons and "CHECK ((amount > 0))" in cons


def test_worker_stops_cleanly_on_sigterm(cluster_factory) -> None:
    cl = cluster_factory()
    cl.start_gateway()
    worker = cl.start_worker()
    created = {post(cl.gateway.url, uuid.uuid4().hex).json()["id"] for _ in range(5)}
    cl.wait_in_postgres(created)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    log = (cl.tmp / "worker-0.log").read_text()
    assert "worker stopped: 5 records applied, 5 new payments" in log, log[-2000:]
