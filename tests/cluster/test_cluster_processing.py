"""Payment processing in cluster mode against the real Redis, Kafka and PostgreSQL.

Two gateway processes behind one port (`serve --workers 2`), two `gateway worker` processes that
consume the payments topic, write PostgreSQL and drive every payment through the state machine, the
router and a PSP, and one `gateway psp-sim` process that both workers call (`GATEWAY_PSP_URL`): a
payment authorized through one worker may be captured or resolved through the other, as with a real
PSP. Every scenario ends with `gateway ledger check --config FILE` passing on PostgreSQL and the
audit log telling the whole story. The last test SIGKILLs a worker in the middle of a burst.

Each cluster has its own PostgreSQL schema, Kafka topic, consumer group and Redis key prefix.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient
from support import GATEWAY, Gateway, auth, free_port, run_cli, start_psp_sim, stop_process

from .conftest import ServiceUrls, cluster_config

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

WAIT = {"Prefer": "wait=8000"}
FINAL = ("captured", "failed", "canceled", "refunded")


class ProcessingCluster:
    """Gateways, workers and the shared PSP simulator of one test module (or one test)."""

    def __init__(self, services: ServiceUrls, tmp: Path, psp_time_scale: float, inflight_max: int = 256) -> None:
        tag = uuid.uuid4().hex[:10]
        self.services = services
        self.tmp = tmp
        self.schema = f"cp_{tag}"
        self.topic = f"payments-{tag}"
        self.prefix = f"p{tag}"
        self.psp_time_scale = psp_time_scale
        self.psp_port = free_port()
        self.psp_url = f"http://127.0.0.1:{self.psp_port}"
        self.worker_env = {
            **os.environ,
            "GATEWAY_PSP_URL": self.psp_url,
            "GATEWAY_PSP_TIME_SCALE": str(psp_time_scale),
            "GATEWAY_PSPS": "psp_a,psp_b",
            "GATEWAY_RECONCILE_INTERVAL_MS": "100",
            "GATEWAY_WORKER_INFLIGHT_MAX": str(inflight_max),
        }
        config_text = cluster_config(services, self.schema, self.topic, f"workers-{tag}", self.prefix)
        self.config_path = tmp / "cluster.toml"
        self.config_path.write_text(config_text)
        self.gateway = Gateway(tmp / "data", config_text)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.psp: subprocess.Popen[bytes] | None = None

    # -- processes -------------------------------------------------------------------------------

    def start(self, workers: int = 2) -> ProcessingCluster:
        self.psp = start_psp_sim(self.psp_port, ("psp_a", "psp_b"), self.psp_time_scale, self.tmp / "psp-sim.log")
        self.gateway.start(timeout_s=90)
        self._wait_both_processes()
        for _ in range(workers):
            self.start_worker()
        return self

    def _wait_both_processes(self, timeout_s: float = 60) -> None:
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"only slots {seen} answered:\n{self.gateway.log()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=2) as c:
                seen.update(re.findall(r"^gateway_cluster_slot (\d+)$", c.get(f"{self.gateway.url}/metrics").text,
                                       re.MULTILINE))

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker-{len(self.workers)}.log").open("ab")
        proc = subprocess.Popen([GATEWAY, "worker", "--config", str(self.config_path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=self.worker_env)
        log.close()
        self.workers.append(proc)
        return proc

    def worker_logs(self) -> str:
        return "\n".join((self.tmp / f"worker-{i}.log").read_text(errors="replace")[-2000:]
                         for i in range(len(self.workers)))

    def stop(self) -> None:
        self.gateway.stop()
        for p in [*self.workers, self.psp]:
            if p is not None and p.poll() is None:
                stop_process(p)

    def cleanup(self) -> None:
        with psycopg.connect(self.services.database_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")  # type: ignore[arg-type]
        admin = AdminClient({"bootstrap.servers": self.services.kafka_bootstrap})
        with contextlib.suppress(Exception):
            admin.delete_topics([self.topic])[self.topic].result(timeout=30)
        r = redis.Redis.from_url(self.services.redis_url)
        with contextlib.suppress(redis.RedisError):
            keys = list(r.scan_iter(f"{self.prefix}:*", count=1000))
            if keys:
                r.delete(*keys)
        r.close()

    def serving(self, workers: int = 2) -> Iterator[ProcessingCluster]:
        """For a fixture: the cluster started, then stopped and cleaned up."""
        try:
            yield self.start(workers)
        finally:
            self.stop()
            self.cleanup()

    # -- merchant API ----------------------------------------------------------------------------

    def create(self, token: str = "tok_visa", capture: bool = False, amount: int = 1000,
               client: httpx.Client | None = None) -> str:
        body = {"amount": amount, "currency": "USD", "payment_method": token, "capture": capture}
        post = client.post if client is not None else httpx.post
        r = post(f"{self.gateway.url}/v1/payments", headers=auth(), json=body, timeout=10)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def get(self, pid: str, wait_ms: int = 8000) -> dict:
        # A new connection per call, so that both gateway processes serve reads.
        r = httpx.get(f"{self.gateway.url}/v1/payments/{pid}", headers={**auth(), "Prefer": f"wait={wait_ms}"},
                      timeout=15)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def op(self, pid: str, kind: str, body: dict | None = None, key: str | None = None,
           wait: bool = True) -> httpx.Response:
        headers = {**auth(), **(WAIT if wait else {})}
        if key is not None:
            headers["Idempotency-Key"] = key
        return httpx.post(f"{self.gateway.url}/v1/payments/{pid}/{kind}", headers=headers, json=body or {},
                          timeout=15)

    # -- PostgreSQL and the PSP ------------------------------------------------------------------

    def query(self, sql: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.services.database_url, autocommit=True) as conn:
            conn.execute(f"SET search_path = {self.schema}")  # type: ignore[arg-type]
            return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]

    def story(self, pid: str) -> list[str]:
        """The payment's statuses in order, from the audit log, each row continuing the one before."""
        rows = self.query("SELECT old_status, new_status FROM audit_log WHERE payment_id = %s ORDER BY id", pid)
        assert rows, f"no audit rows for {pid}"
        assert all(rows[i][1] == rows[i + 1][0] for i in range(len(rows) - 1)), rows
        return [rows[0][0], *(r[1] for r in rows)]

    def attempts(self, pid: str) -> list[tuple]:
        return self.query(
            "SELECT operation, psp, idempotency_key, status, code FROM payment_attempts WHERE payment_id = %s"
            " ORDER BY started_at_ms, attempt_id", pid)

    def assert_ledger_ok(self) -> None:
        proc = run_cli("ledger", "check", "--config", str(self.config_path), check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert re.search(r"ledger check: [1-9]\d* postings, 0 violations", proc.stdout), proc.stdout

    def settled_at_psp(self) -> dict[str, list[int]]:
        """Capture amounts per payment (our reference) in today's settlement files of every PSP."""
        out: dict[str, list[int]] = {}
        day = datetime.now(UTC).date().isoformat()
        for psp in ("psp_a", "psp_b"):
            text = httpx.get(f"{self.psp_url}/v1/{psp}/settlement/{day}.csv", timeout=10).text
            for row in csv.DictReader(io.StringIO(text)):
                if int(row["amount"]) > 0:
                    out.setdefault(row["reference"], []).append(int(row["amount"]))
        return out


@pytest.fixture(scope="module")
def cl(services: ServiceUrls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessingCluster]:
    yield from ProcessingCluster(services, tmp_path_factory.mktemp("cproc"), psp_time_scale=0.01).serving()


def code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


# -- scenarios -------------------------------------------------------------------------------------


def test_authorize_with_auto_capture_is_processed_by_the_workers(cl: ProcessingCluster) -> None:
    pid = cl.create(capture=True, amount=2500)
    p = cl.get(pid)
    assert (p["status"], p["amount_captured"], p["amount_capturable"]) == ("captured", 2500, 0), p
    assert [a["operation"] for a in p["attempts"]] == ["authorize", "capture"]
    assert cl.story(pid) == ["processing", "authorized", "captured"]
    assert cl.settled_at_psp()[pid] == [2500], "the PSP settled the capture once"
    cl.assert_ledger_ok()


def test_partial_capture_then_multiple_partial_refunds_across_gateway_processes(cl: ProcessingCluster) -> None:
    pid = cl.create(capture=False)
    p = cl.get(pid)
    assert (p["status"], p["amount_capturable"]) == ("authorized", 1000), p
    r = cl.op(pid, "capture", {"amount": 600}, key=f"cap-{pid}")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["amount_captured"], r.json()["amount_capturable"]) == ("captured", 600, 400)
    replay = cl.op(pid, "capture", {"amount": 600}, key=f"cap-{pid}")
    assert (replay.status_code, replay.headers.get("idempotent-replayed")) == (200, "true")
    assert replay.json() == r.json(), "a replay in any process answers the stored response"
    for amount, status in ((100, "partially_refunded"), (200, "partially_refunded"), (300, "refunded")):
        r = cl.op(pid, "refunds", {"amount": amount, "reason": "requested_by_customer"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == status
    p = cl.get(pid)
    assert (p["amount_captured"], p["amount_refunded"], p["amount_capturable"]) == (600, 600, 0)
    assert [(x["amount"], x["status"]) for x in p["refunds"]] == [(100, "succeeded"), (200, "succeeded"),
                                                                  (300, "succeeded")]
    assert [a["operation"] for a in p["attempts"]] == ["authorize", "capture", "refund", "refund", "refund"]
    assert code(cl.op(pid, "refunds", {"amount": 1})) == "payment_already_refunded"
    assert cl.story(pid) == ["processing", "authorized", "captured", "partially_refunded", "partially_refunded",
                             "refunded"]
    assert cl.settled_at_psp()[pid] == [600]
    cl.assert_ledger_ok()


def test_void_cancels_the_authorization(cl: ProcessingCluster) -> None:
    pid = cl.create()
    assert cl.get(pid)["status"] == "authorized"
    r = cl.op(pid, "void")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["amount_capturable"]) == ("canceled", 0)
    assert code(cl.op(pid, "capture")) == "payment_already_canceled"
    assert cl.story(pid) == ["processing", "authorized", "canceled"]
    assert pid not in cl.settled_at_psp()
    cl.assert_ledger_ok()


def test_hard_decline_fails_the_payment_without_retry(cl: ProcessingCluster) -> None:
    pid = cl.create("tok_decline_stolen", capture=True)
    p = cl.get(pid)
    assert (p["status"], p["failure_code"]) == ("failed", "stolen_card"), p
    assert [(a[0], a[3]) for a in cl.attempts(pid)] == [("authorize", "hard_decline")]
    assert cl.story(pid) == ["processing", "failed"]
    assert code(cl.op(pid, "capture")) == "payment_not_capturable"
    cl.assert_ledger_ok()


def test_timeout_goes_to_pending_verification_and_the_reconciler_resolves_it(cl: ProcessingCluster) -> None:
    pid = cl.create("tok_timeout")
    p = cl.get(pid, wait_ms=10_000)
    assert p["status"] == "authorized", p
    assert cl.story(pid) == ["processing", "pending_verification", "authorized"]
    rows = cl.attempts(pid)
    assert len(rows) == 1 and rows[0][3] == "approved", "resolved by a status query on the same attempt"
    cl.assert_ledger_ok()


def test_psp_outage_fails_over_to_the_other_psp(cl: ProcessingCluster) -> None:
    pid = cl.create("tok_psp_error_once", capture=True)
    p = cl.get(pid)
    assert p["status"] == "captured", p
    auths = [a for a in cl.attempts(pid) if a[0] == "authorize"]
    assert auths[-1][3] == "approved"
    assert {a[1] for a in auths if a[3] == "error"} == {"psp_a", "psp_b"}, "failed over to the other PSP"
    assert len({a[2] for a in auths}) == len(auths), "every attempt has its own PSP idempotency key"
    assert cl.story(pid) == ["processing", "authorized", "captured"]
    cl.assert_ledger_ok()


def test_list_serves_processed_payments_newest_first(cl: ProcessingCluster) -> None:
    ids = [cl.create(capture=True, amount=700 + i) for i in range(3)]
    for pid in ids:
        assert cl.get(pid)["status"] == "captured"
    r = httpx.get(f"{cl.gateway.url}/v1/payments", params={"limit": 3}, headers=auth(), timeout=10)
    assert r.status_code == 200, r.text
    page = r.json()
    assert [p["id"] for p in page["data"]] == ids[::-1] or {p["id"] for p in page["data"]} == set(ids)
    assert all(p["status"] == "captured" and p["amount_captured"] == p["amount"] for p in page["data"])
    nxt = httpx.get(f"{cl.gateway.url}/v1/payments", params={"limit": 1, "starting_after": page["data"][-1]["id"]},
                    headers=auth(), timeout=10).json()
    assert nxt["data"] and nxt["data"][0]["id"] not in {p["id"] for p in page["data"]}


def test_concurrent_captures_through_both_gateway_processes_run_one_at_a_time(cl: ProcessingCluster) -> None:
    pid = cl.create(amount=1000)
    assert cl.get(pid)["status"] == "authorized"
    with ThreadPoolExecutor(8) as pool:  # a new connection per request: both processes answer
        responses = list(pool.map(lambda _: cl.op(pid, "capture", {"amount": 100}, wait=False), range(8)))
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code != 202]
    assert accepted, [r.text for r in responses]
    assert all(r.status_code == 409 and code(r) == "payment_operation_in_progress" for r in refused), [
        r.text for r in refused]
    p = cl.get(pid)
    assert (p["status"], p["amount_captured"]) == ("captured", 100 * len(accepted)), p
    ops = cl.query("SELECT created_ms, updated_ms, status FROM payment_operations WHERE payment_id = %s"
                   " ORDER BY created_ms", pid)
    assert [o[2] for o in ops] == ["succeeded"] * len(accepted)
    assert all(ops[i + 1][0] >= ops[i][1] for i in range(len(ops) - 1)), f"operations overlapped: {ops}"
    cl.assert_ledger_ok()


# -- a worker killed in the middle of a burst -------------------------------------------------------


def test_sigkill_of_a_worker_mid_burst_leaves_every_payment_final_once_and_never_charged_twice(
    services: ServiceUrls, tmp_path: Path
) -> None:
    # Slower PSP calls (about 5-30 ms each) so that the kill lands while calls are in flight; a bounded
    # number in flight per worker, within what the simulated PSPs accept without capacity errors.
    c = ProcessingCluster(services, tmp_path, psp_time_scale=0.1, inflight_max=16)
    # One timeout in ten, no PSP errors: more of them in a burst open both circuit breakers (5 failures in
    # a row), and the rest of the burst fails fast with psp_unavailable, a story of its own.
    tokens = ["tok_visa", "tok_mastercard", "tok_decline_stolen", "tok_visa", "tok_mastercard", "tok_visa",
              "tok_timeout", "tok_visa", "tok_mastercard", "tok_visa"]
    try:
        c.start()
        ids: list[str] = []

        def make(i: int) -> str:
            with httpx.Client(timeout=10) as client:
                return c.create(tokens[i % len(tokens)], capture=True, amount=1000 + i, client=client)

        with ThreadPoolExecutor(16) as pool:
            first = pool.map(make, range(120))
            ids += list(first)
            victim = c.workers[0]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
            in_flight = c.query("SELECT count(*) FROM payment_attempts WHERE status = 'started'")[0][0]
            final_at_kill = c.query("SELECT count(*) FROM payments WHERE id = ANY(%s) AND status IN"
                                    " ('captured', 'failed')", ids)[0][0]
            assert final_at_kill < len(ids), "the kill must land while payments are being processed"
            ids += list(pool.map(make, range(120, 200)))
        deadline = time.monotonic() + 60
        while True:
            rows = dict(c.query("SELECT id, status FROM payments WHERE id = ANY(%s)", ids))
            open_ops = c.query("SELECT count(*) FROM payment_operations WHERE status IN ('pending',"
                               " 'pending_verification')")[0][0]
            if len(rows) == len(ids) and all(s in FINAL for s in rows.values()) and open_ops == 0:
                break
            assert time.monotonic() < deadline, (
                {s: sum(1 for v in rows.values() if v == s) for s in set(rows.values())},
                len(ids) - len(rows), open_ops, c.worker_logs())
            time.sleep(0.2)
        c.assert_ledger_ok()
        # Exactly one final transition per payment, and a story that chains from `processing`.
        finals = dict(c.query("SELECT payment_id, count(*) FROM audit_log WHERE payment_id = ANY(%s)"
                              " AND new_status IN ('captured', 'failed') GROUP BY payment_id", ids))
        assert finals == {pid: 1 for pid in ids}, "every payment reached its final state exactly once"
        for pid in ids[::10]:
            s = c.story(pid)
            assert s[0] == "processing" and s[-1] == rows[pid]
        # Never authorized twice, never captured twice: the attempt rows and the PSP's own books.
        auths = c.query("SELECT payment_id, attempt_no, idempotency_key, status FROM payment_attempts"
                        " WHERE operation = 'authorize' AND payment_id = ANY(%s)", ids)
        assert all(key == f"{pid}:auth:{n}" for pid, n, key, _ in auths), "PSP keys are derived, never replaced"
        approved: dict[str, int] = {}
        for pid, _n, _key, status in auths:
            approved[pid] = approved.get(pid, 0) + (status == "approved")
        assert max(approved.values()) == 1, "no payment was authorized twice"
        captured = dict(c.query("SELECT id, amount_captured FROM payments WHERE id = ANY(%s)",
                                ids))
        settled = c.settled_at_psp()
        for pid in ids:
            assert sum(settled.get(pid, [])) == captured[pid], (pid, settled.get(pid), captured[pid])
            assert len(settled.get(pid, [])) <= 1, f"{pid} was captured twice at the PSP"
        failures = c.query("SELECT failure_code, count(*) FROM payments WHERE id = ANY(%s)"
                           " GROUP BY failure_code", ids), c.query(
                           "SELECT operation, status, code, count(*) FROM payment_attempts GROUP BY 1, 2, 3")
        assert sum(1 for s in rows.values() if s == "captured") >= len(ids) // 2, failures
        print(f"at the kill: {len(ids) - 80 - final_at_kill} of 120 payments unfinished, {in_flight} PSP calls"
              " in flight (intent recorded, no result)")
    finally:
        c.stop()
        c.cleanup()


def test_an_operation_before_any_worker_stored_the_payment_is_409_not_ready_then_succeeds(
    services: ServiceUrls, tmp_path: Path
) -> None:
    c = ProcessingCluster(services, tmp_path, psp_time_scale=0.01)
    try:
        c.start(workers=0)
        pid = c.create(capture=False)
        r = c.op(pid, "capture", wait=False)
        assert (r.status_code, code(r), r.headers.get("retry-after")) == (409, "payment_not_ready", "1"), r.text
        other = c.op("pay_" + "0" * 24, "capture", wait=False)
        assert (other.status_code, code(other)) == (404, "resource_missing")
        c.start_worker()  # a late worker stores the payment and authorizes it
        assert c.get(pid, wait_ms=30_000)["status"] == "authorized"
        r = c.op(pid, "capture")
        assert r.status_code == 200 and r.json()["status"] == "captured", r.text
        assert c.story(pid) == ["processing", "authorized", "captured"]
        c.assert_ledger_ok()
    finally:
        c.stop()
        c.cleanup()
