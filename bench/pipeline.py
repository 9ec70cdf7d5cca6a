"""Whole-pipeline benchmark: open-loop creates at fixed offered rates, and how fast payments become final.

Per offered rate (one step each, `--step-seconds` long), with k6 as the open-loop generator (the
bench/http_bench.py harness and bench/k6_open_loop.js with ACK_LOG=1, which logs every 2xx answer's
Idempotency-Key and wall-clock time):

- accepted/s (2xx acknowledged) and the acknowledgement latency P50/P99 (from each request's intended
  send time: corrected for coordinated omission);
- settled/s: payments that reached a final status (anything but `processing` and `pending_verification`)
  during the step, counted in the store; after the step the run waits until every acknowledged payment
  is final (the drain, bounded by `--drain-timeout-s`) so each step starts with an empty backlog;
- time to final P50/P99: from a payment's acknowledgement to the first time the harness saw it final
  (the store is polled for the oldest payments not final yet, a bounded number per poll);
- the backlog (acknowledged minus final, from the store) every 0.5 s over the step and its drain;
- CPU seconds per payment of each process (utime + stime from /proc/<pid>/stat, step start to drain end);
- PostgreSQL transactions and rows written per payment (pg_stat_database, pg_stat_user_tables;
  statements from pg_stat_statements when that extension is installed); null on SQLite.

    .venv/bin/python bench/pipeline.py --mode embedded --psp-time-scale 0 --rates 500,1000,2000 --step-seconds 5
    .venv/bin/python bench/pipeline.py --mode cluster --psp-time-scale 0 --rates 100,200 --step-seconds 3
    .venv/bin/python bench/pipeline.py --mode embedded --quick --out /tmp/pipeline   # seconds-long smoke

Results: report.json (+ rate_vs_settled.png, backlog.png) in `--out` (default bench/results/pipeline-<ts>/).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import http_bench as hb

NOT_FINAL = ("processing", "pending_verification")
ACCEPTED = ("200", "201", "202")
DEMO_KEY = "sk_test_demo"
# The targets file of bench/cluster_bench.py's k6 runs: one body, a key id per entry (k6 makes the
# Idempotency-Key unique per step and wrap-around), so every request creates a payment.
K6_TARGETS = 10_000
VUS_MAX = 2_000
SAMPLE_S = 0.5
POLL_MIN_S = 0.02
# The poller sleeps this many times as long as its last poll took: at most ~10% of a core.
POLL_DUTY_FACTOR = 9
# Payments checked per poll: the oldest half of this, and a window that rotates over the rest.
POLL_KEYS_MAX = 1000
GENERATOR_LIMITED_SHARE = 0.95
ACK_LINE = re.compile(r'msg="ack (\S+) (\d+)"')
PG_STATS_FLUSH_S = 11.0  # PostgreSQL 15 flushes an idle backend's counters within 10 s


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values)
    return {"count": len(values), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


# --------------------------------------------------------------------------------------------- stores


class SqliteReader:
    """The embedded store (data_dir/gateway.db), read-only, one short read transaction per query."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.queries = 0
        self._conn: sqlite3.Connection | None = None

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                         timeout=5)
        return self._conn

    def query(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        self.queries += 1
        return self._c().execute(sql.replace("%s", "?"), args).fetchall()

    def in_list(self, n: int) -> str:
        return ",".join("?" * n)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresReader:
    """One schema of the cluster's PostgreSQL; every query is its own (autocommit) transaction, and
    `queries` counts them so that the harness can take its own out of pg_stat_database."""

    kind = "postgres"

    def __init__(self, url: str, schema: str) -> None:
        import psycopg

        self.queries = 0
        self._conn = psycopg.connect(url, autocommit=True, application_name="pipeline-bench-poller")
        self._conn.execute(f"SET search_path = {schema}")  # type: ignore[arg-type]
        self.queries += 1

    def query(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        self.queries += 1
        return list(self._conn.execute(sql.replace("(?)", "(%s)"), args).fetchall())  # type: ignore[arg-type]

    def in_list(self, n: int) -> str:
        return ",".join(["%s"] * n)

    def close(self) -> None:
        self._conn.close()


def final_count(store: SqliteReader | PostgresReader) -> tuple[int, int]:
    """(payments in the store, payments in a final status)."""
    row = store.query("SELECT count(*), sum(CASE WHEN status NOT IN (%s, %s) THEN 1 ELSE 0 END) FROM payments",
                      NOT_FINAL)[0]
    return int(row[0]), int(row[1] or 0)


def psp_calls(store: SqliteReader | PostgresReader) -> dict[str, int] | None:
    try:
        return {str(p): int(n) for p, n in store.query("SELECT psp, count(*) FROM payment_attempts GROUP BY psp")}
    except Exception:  # noqa: BLE001 - the table belongs to a schema being redesigned
        return None


# --------------------------------------------------------------------------------------------- follower


class Follower(threading.Thread):
    """Follows every acknowledged payment to its final status.

    Tails k6's log for `ack <key> <ms>` lines (the step's acknowledgements, in order), polls the store
    for the oldest acknowledged payments not yet seen final (bounded work per poll, plus a window that
    rotates over the rest so that one stuck payment does not hide the others), and samples the backlog
    (acknowledged minus final in the store) every SAMPLE_S.
    """

    def __init__(self, make_store: Any) -> None:
        super().__init__(daemon=True, name="pipeline-follower")
        self.make_store = make_store
        self.lock = threading.Lock()
        self.log_path: Path | None = None
        self._log: Any = None
        self._partial = b""
        self.ack_ms: dict[str, int] = {}
        self.pending: OrderedDict[str, int] = OrderedDict()
        self.final_ms: dict[str, float] = {}
        self.samples: list[dict[str, float | int]] = []
        self.poll_s: list[float] = []
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.store: SqliteReader | PostgresReader | None = None
        self._rotate = 0
        self.merchant: str | None = None

    def follow(self, log_path: Path) -> None:
        with self.lock:
            self.read_acks()
            if self._log is not None:
                self._log.close()
            self.log_path, self._log, self._partial = log_path, None, b""

    def read_acks(self) -> None:
        if self._log is None:
            if self.log_path is None or not self.log_path.exists():
                return
            self._log = self.log_path.open("rb")
        chunk = self._partial + self._log.read()
        lines = chunk.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            m = ACK_LINE.search(line.decode(errors="replace"))
            if m and m.group(1) not in self.ack_ms:
                self.ack_ms[m.group(1)] = int(m.group(2))
                self.pending[m.group(1)] = int(m.group(2))

    def poll(self) -> None:
        assert self.store is not None
        with self.lock:
            self.read_acks()
            keys = list(itertools.islice(self.pending, POLL_KEYS_MAX // 2))
            rest = len(self.pending) - len(keys)
            if rest > 0:
                start = len(keys) + self._rotate % rest
                keys += list(itertools.islice(self.pending, start, start + POLL_KEYS_MAX // 2))
                self._rotate += POLL_KEYS_MAX // 2
        if keys:
            if self.merchant is None:
                # The run's only merchant (the demo one): the lookup uses the (merchant_id, idempotency_key) index.
                merchants = self.store.query("SELECT id FROM merchants")
                self.merchant = str(merchants[0][0]) if len(merchants) == 1 else ""
            by_merchant = "merchant_id = %s AND " if self.merchant else ""
            rows = self.store.query(
                f"SELECT idempotency_key FROM payments WHERE {by_merchant}idempotency_key IN"
                f" ({self.store.in_list(len(keys))}) AND status NOT IN ({self.store.in_list(2)})",
                [*([self.merchant] if self.merchant else []), *keys, *NOT_FINAL])
            seen = time.time() * 1000
            with self.lock:
                for (key,) in rows:
                    if self.pending.pop(key, None) is not None:
                        self.final_ms[key] = seen

    def sample(self) -> None:
        assert self.store is not None
        rows, final = final_count(self.store)
        with self.lock:
            acked = len(self.ack_ms)
        self.samples.append({"t": time.time(), "acknowledged": acked, "in_store": rows, "final": final,
                             "backlog": max(0, acked - final)})

    def run(self) -> None:
        try:
            self.store = self.make_store()
            next_sample = 0.0
            while not self.stop_flag.is_set():
                t0 = time.monotonic()
                self.poll()
                if t0 >= next_sample:
                    self.sample()
                    next_sample = t0 + SAMPLE_S
                took = time.monotonic() - t0
                self.poll_s.append(took)
                self.stop_flag.wait(max(POLL_MIN_S, POLL_DUTY_FACTOR * took))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def acked_total(self) -> int:
        with self.lock:
            self.read_acks()
            return len(self.ack_ms)

    def pending_count(self) -> int:
        with self.lock:
            return len(self.pending)

    def last_final(self) -> int:
        return int(self.samples[-1]["final"]) if self.samples else 0

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(10)
        if self.store is not None:
            self.store.close()


# --------------------------------------------------------------------------------------------- processes


def own_cpu_s() -> float:
    """CPU seconds of this harness and of its waited-for children (every k6 step so far)."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def machine_busy_s() -> float:
    return sum(v for k, v in hb.cores_busy_s().items() if k != hb.IOWAIT_KEY)


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids = [int(c) for c in (task / "children").read_text().split()]
                    out += kids
                    todo += kids
    return out


class Processes:
    """Named groups of processes whose CPU time (utime + stime of each live process) is read per step."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}

    def add(self, name: str, pids: Any) -> None:
        """`pids`: a list, or a function returning the group's current pids (children appear later)."""
        self.groups[name] = pids

    def cpu(self) -> dict[str, dict[int, float]]:
        """CPU seconds of every live process of each group, by pid."""
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            out[name] = {}
            for pid in (pids() if callable(pids) else pids):
                cpu = hb.proc_cpu_s(pid)
                if cpu is not None:
                    out[name][pid] = cpu
        return out

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        return {n: [{"pid": pid, "cmdline": cmdline(pid)[:200]} for pid in (p() if callable(p) else p)]
                for n, p in self.groups.items()}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two readings; a process born in between counts whole, one that ended is lost."""
    return sum(c - before.get(pid, 0.0) for pid, c in after.items())


def postgres_pids(conn: Any, app: str) -> tuple[list[int], list[int]]:
    """Backends of this run (application_name set through PGAPPNAME) and the server's auxiliary processes."""
    rows = conn.execute("SELECT pid, backend_type, application_name FROM pg_stat_activity").fetchall()
    mine = [int(p) for p, t, a in rows if t == "client backend" and a == app]
    aux = [int(p) for p, t, _ in rows if t != "client backend"]
    return mine, aux


# --------------------------------------------------------------------------------------------- systems


class Embedded:
    """`gateway serve` (embedded mode) pinned to the server core(s). Its processes: granian's supervisor,
    the HTTP process (a fork, same command line) and the payment worker, a child of the HTTP process
    started with a command line of its own (`python -m gateway.runtime.worker_process ...`)."""

    def __init__(self, work: Path, time_scale: float, plan: dict[str, Any]) -> None:
        self.work = work
        self.data = work / "data"
        base = (BENCH / "gateway-bench.toml").read_text()
        config = work / "gateway.toml"
        # The PSP time scale goes both ways: config file ([psp] time_scale) and environment.
        config.write_text(base if "[psp]" in base else base + f"\n[psp]\ntime_scale = {time_scale}\n")
        self.port = hb.free_port()
        exe = str(hb.VENV_BIN / "gateway")
        argv = [exe, "serve", "--config", str(config), "--data-dir", str(self.data), "--port", str(self.port),
                "--demo"]
        env = {**os.environ, "GATEWAY_WORKER": "on", "GATEWAY_PSP_TIME_SCALE": str(time_scale),
               "PYTHONDONTWRITEBYTECODE": "1"}
        self.server = hb.Server("gateway", argv, self.port, env, hb.REPO)
        self.plan = plan
        self.procs = Processes()

    def start(self) -> None:
        hb.start_server(self.server, self.plan["server_cpus"], self.work)
        assert self.server.proc is not None
        root = self.server.proc.pid
        own = cmdline(root)

        def split(http: bool) -> list[int]:
            kids = descendants(root)
            forks = [p for p in kids if cmdline(p) == own]
            if http:
                return [root, *forks]
            return [p for p in kids if p not in forks]

        self.procs.add("http", lambda: split(True))
        self.procs.add("worker", lambda: split(False))

    def store(self) -> SqliteReader:
        return SqliteReader(self.data / "gateway.db")

    def sql_counters(self) -> dict[str, Any] | None:
        return None

    def stop(self) -> None:
        hb.stop_server(self.server)


class Cluster:
    """One `gateway serve` (pinned to the server core), N `gateway worker`s, one `gateway psp-sim`, a fresh
    PostgreSQL schema, Kafka topic and Redis prefix (bench/cluster_bench.py's Deployment, dropped after)."""

    def __init__(self, work: Path, time_scale: float, plan: dict[str, Any], workers: int) -> None:
        import cluster_bench as cb

        self.svc = cb.services()
        self.dep = cb.Deployment(self.svc, "wal", work, 1)
        self.app = f"pipeline-{uuid.uuid4().hex[:8]}"
        self.psp_port = hb.free_port()
        with self.dep.config.open("a") as f:
            f.write(f'\n[psp]\ntime_scale = {time_scale}\nurl = "http://127.0.0.1:{self.psp_port}"\n')
        self.env = {**os.environ, "GATEWAY_WORKER": "on", "GATEWAY_PSP_TIME_SCALE": str(time_scale),
                    "GATEWAY_PSP_URL": f"http://127.0.0.1:{self.psp_port}", "PGAPPNAME": self.app,
                    "PYTHONDONTWRITEBYTECODE": "1"}
        self.time_scale = time_scale
        self.plan = plan
        self.workers = workers
        self.port = self.dep.port
        self.procs = Processes()
        self.servers: list[hb.Server] = []
        self._stats: Any = None

    def start(self) -> None:
        import psycopg

        exe = str(hb.VENV_BIN / "gateway")
        d = self.dep.dir
        subprocess.run([exe, "db", "migrate", "--config", str(self.dep.config)], check=True, capture_output=True,
                       env=self.env)
        # The simulator and PostgreSQL/Kafka/Redis are shared by the whole cluster: not pinned.
        sim = hb.Server("psp-sim", [exe, "psp-sim", "--port", str(self.psp_port), "--config", str(self.dep.config),
                                    "--time-scale", str(self.time_scale)], self.psp_port, self.env, hb.REPO,
                        ready_path="/health")
        hb.start_server(sim, None, d)
        serve = hb.Server("gateway", [exe, "serve", "--config", str(self.dep.config), "--data-dir", str(d / "data"),
                                      "--port", str(self.port), "--workers", "1", "--demo"], self.port, self.env,
                          hb.REPO)
        hb.start_server(serve, self.plan["server_cpus"], d)
        self.servers = [sim, serve]
        workers = []
        for n in range(self.workers):
            log = (d / f"worker-{n}.log").open("ab")
            p = subprocess.Popen([exe, "worker", "--config", str(self.dep.config)], stdout=log,
                                 stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            log.close()
            self.dep.procs.append(p)
            workers.append(p.pid)
        for s in self.servers:
            assert s.proc is not None
        root = serve.proc.pid  # type: ignore[union-attr]
        self.procs.add("http", lambda: [root, *descendants(root)])
        self.procs.add("worker", lambda: [p for w in workers for p in (w, *descendants(w))])
        sim_root = sim.proc.pid  # type: ignore[union-attr]
        self.procs.add("psp_sim", lambda: [sim_root, *descendants(sim_root)])
        self._stats = psycopg.connect(self.svc["DATABASE_URL"], autocommit=True,
                                      application_name="pipeline-bench-stats")
        self.stats_queries = 0
        self.procs.add("postgres_backends", lambda: self._pg_pids()[0])
        self.procs.add("postgres_auxiliary", lambda: self._pg_pids()[1])
        status = subprocess.run(["bash", str(hb.REPO / "deploy" / "services.sh"), "status"], capture_output=True,
                                text=True, check=False).stdout
        for name, pid in re.findall(r"^(redis|kafka): running .*\(pid (\d+)\)", status, re.MULTILINE):
            self.procs.add(name, [int(pid)])

    def _pg_pids(self) -> tuple[list[int], list[int]]:
        self.stats_queries += 1
        return postgres_pids(self._stats, self.app)

    def store(self) -> PostgresReader:
        return PostgresReader(self.svc["DATABASE_URL"], self.dep.schema)

    def sql_counters(self) -> dict[str, Any]:
        """Cumulative counters; the harness's own transactions are counted (`harness_xacts`) to be taken off."""
        self.stats_queries += 2
        db = self._stats.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                                 " WHERE datname = current_database()").fetchone()
        rows = self._stats.execute("SELECT coalesce(sum(n_tup_ins), 0), coalesce(sum(n_tup_upd), 0),"
                                   " coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables WHERE schemaname = %s",
                                   (self.dep.schema,)).fetchone()
        statements = None
        with contextlib.suppress(Exception):
            self.stats_queries += 1
            statements = int(self._stats.execute(
                "SELECT sum(calls) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE d.datname = current_database()").fetchone()[0])
        return {"xacts": int(db[0]), "rows_inserted": int(rows[0]), "rows_updated": int(rows[1]),
                "rows_deleted": int(rows[2]), "statements": statements, "harness_queries": self.stats_queries}

    def stop(self) -> None:
        if self._stats is not None:
            self._stats.close()
        self.dep.stop()
        for s in reversed(self.servers):
            hb.stop_server(s)
        self.dep.cleanup()


# --------------------------------------------------------------------------------------------- steps


def wait_drained(follower: Follower, timeout_s: float) -> tuple[bool, float]:
    """Until every acknowledged payment is final in the store and seen final by the follower."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if follower.error is not None:
            raise follower.error
        if follower.last_final() >= follower.acked_total() and follower.pending_count() == 0:
            return True, time.monotonic() - t0
        time.sleep(0.05)
    return False, time.monotonic() - t0


def settle_rate(samples: list[dict[str, Any]], a: float, b: float) -> float | None:
    """Payments made final per second between the first and the last store sample within [a, b]."""
    inside = [s for s in samples if a <= s["t"] <= b]
    if len(inside) < 2 or inside[-1]["t"] - inside[0]["t"] < 0.2:
        return None
    return round((inside[-1]["final"] - inside[0]["final"]) / (inside[-1]["t"] - inside[0]["t"]), 1)


def sql_per_payment(before: dict[str, Any] | None, after: dict[str, Any] | None, harness: int,
                    payments: int) -> dict[str, Any] | None:
    if before is None or after is None or payments <= 0:
        return None
    xacts = after["xacts"] - before["xacts"] - harness
    out: dict[str, Any] = {"xacts_per_payment": round(xacts / payments, 2)}
    for k in ("rows_inserted", "rows_updated", "rows_deleted"):
        out[f"{k}_per_payment"] = round((after[k] - before[k]) / payments, 2)
    st1, st0 = after.get("statements"), before.get("statements")
    out["statements_per_payment"] = (round((st1 - st0 - harness) / payments, 2)
                                     if st1 is not None and st0 is not None else None)
    return out


def run_step(system: Embedded | Cluster, follower: Follower, k6: Path, targets: Path, rate: float,
             seconds: float, run_id: str, plan: dict[str, Any], drain_timeout_s: float,
             harness_queries: Any) -> dict[str, Any]:
    work = system.work if isinstance(system, Embedded) else system.dep.dir
    follower.follow(work / f"k6-{run_id}.log")
    acked0 = follower.acked_total()
    keys0 = set(follower.ack_ms)
    store = system.store()
    psp0 = psp_calls(store)
    sql0, h0 = system.sql_counters(), harness_queries()
    cpu0, t0, busy0, own0 = system.procs.cpu(), time.time(), machine_busy_s(), own_cpu_s()
    k6_step = hb.run_step(k6, targets, system.port, rate, seconds, run_id, plan["generator_cpus"],
                          plan["server_cpus"], VUS_MAX, [DEMO_KEY], work)
    cpu1, t1 = system.procs.cpu(), time.time()
    drained, drain_s = wait_drained(follower, drain_timeout_s)
    cpu2, t2, busy2, own2 = system.procs.cpu(), time.time(), machine_busy_s(), own_cpu_s()
    sql1, h1 = system.sql_counters(), harness_queries()
    psp1 = psp_calls(store)
    store.close()
    with follower.lock:
        keys = [k for k in follower.ack_ms if k not in keys0]
        ack = {k: follower.ack_ms[k] for k in keys}
        fin = {k: follower.final_ms[k] for k in keys if k in follower.final_ms}
    samples = [s for s in follower.samples if t0 - SAMPLE_S <= s["t"] <= t2 + SAMPLE_S]
    acked = sum(k6_step["status_counts"].get(s, 0) for s in ACCEPTED)
    # The step's window: from its first acknowledgement for `seconds` (k6 starts after its VUs are up).
    w0 = min(ack.values()) / 1000 if ack else t0
    w1 = min(w0 + seconds, t1)
    at_end = [s["backlog"] for s in samples if s["t"] <= t1]
    backlog_max = max((s["backlog"] for s in samples), default=0)
    generator_limited = k6_step["send_rate"] < GENERATOR_LIMITED_SHARE * rate
    cpu: dict[str, dict[str, Any]] = {}
    for name in cpu0:
        total = cpu_delta(cpu0[name], cpu2[name])
        cpu[name] = {"cpu_s_step": round(cpu_delta(cpu0[name], cpu1[name]), 3),
                     "cpu_s_step_and_drain": round(total, 3), "processes": len(cpu2[name]),
                     "cpu_us_per_payment": round(total / acked * 1e6, 1) if acked else None}
    measured = sum(c["cpu_s_step_and_drain"] for c in cpu.values()) + own2 - own0
    machine = {"cores_busy": round((busy2 - busy0) / (t2 - t0), 2),
               "harness_and_k6_cpu_s": round(own2 - own0, 2),
               # Busy core time no process of the run accounts for: other work on the machine.
               "others_cores": round(max(0.0, busy2 - busy0 - measured) / (t2 - t0), 2)}
    backlog = [{"t_s": round(s["t"] - w0, 2), "backlog": s["backlog"], "acknowledged": s["acknowledged"] - acked0,
                "final": s["final"]} for s in samples]
    return {
        "offered_rate": rate,
        "duration_s": seconds,
        "send_rate": k6_step["send_rate"],
        "generator_limited": generator_limited,
        "generator": k6_step["generator"] | {"dropped": k6_step["dropped"]},
        "server_cores_busy_share": k6_step["server_cores_busy_share"],
        "machine": machine,
        "status_counts": k6_step["status_counts"],
        "error_rate": k6_step["error_rate"],
        "acknowledged": acked,
        "acknowledged_logged": len(ack),
        "accepted_per_s": round(acked / seconds, 1),
        "settled_per_s": settle_rate(samples, w0, w1),
        "backlog_at_step_end": at_end[-1] if at_end else None,
        "backlog_max": backlog_max,
        # The pipeline kept up: the backlog never exceeded one second of acknowledgements.
        "kept_up": drained and backlog_max <= max(10.0, acked / seconds),
        "drained": drained,
        "drain_s": round(drain_s, 2),
        # Payments made final after the step ended, per second of drain: the pipeline's settle rate
        # with the generator stopped.
        "drain_settled_per_s": settle_rate(samples, t1, t2) if drain_s > 1.0 else None,
        "final_at_end": len(fin),
        "not_final_at_end": len(ack) - len(fin),
        "ack_latency": {k: k6_step["latency_corrected"][k] for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms")},
        "time_to_final": percentiles([fin[k] - ack[k] for k in fin]),
        "cpu": cpu,
        "sql": sql_per_payment(sql0, sql1, h1 - h0, acked),
        "psp_calls": {p: n - (psp0 or {}).get(p, 0) for p, n in psp1.items()} if psp1 is not None else None,
        "backlog_samples": backlog,
    }


# --------------------------------------------------------------------------------------------- output


def write_plots(report: dict[str, Any], out: Path) -> list[str] | str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib not importable ({exc}): no plots"
    steps = report["steps"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rates = [s["offered_rate"] for s in steps]
    ax.plot(rates, [s["accepted_per_s"] for s in steps], "o-", label="accepted/s (2xx)")
    ax.plot(rates, [s["settled_per_s"] or float("nan") for s in steps], "s-", label="settled/s (final, during the step)")
    ax.plot(rates, [s["drain_settled_per_s"] or float("nan") for s in steps], "^--", label="settled/s while draining")
    ax.plot(rates, rates, ":", color="grey", label="offered")
    ax.set_xlabel("offered creates/s")
    ax.set_ylabel("payments/s")
    ax.set_title(f"pipeline, {report['mode']} mode, PSP time scale {report['config']['psp_time_scale']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rate_vs_settled.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in steps:
        pts = s["backlog_samples"]
        ax.plot([p["t_s"] for p in pts], [p["backlog"] for p in pts], label=f"{s['offered_rate']:g}/s")
    ax.axvline(report["config"]["step_seconds"], color="grey", ls=":", label="end of offered load")
    ax.set_xlabel("seconds since the step's first acknowledgement")
    ax.set_ylabel("backlog (acknowledged, not final)")
    ax.set_title("backlog over time per offered rate (step, then drain)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "backlog.png", dpi=110)
    plt.close(fig)
    return ["rate_vs_settled.png", "backlog.png"]


def fmt(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(report: dict[str, Any]) -> None:
    groups = list(report["steps"][0]["cpu"]) if report["steps"] else []
    head = (f"{'offered':>8} {'sent':>7} {'accept/s':>8} {'settle/s':>8} {'drain/s':>7} {'ack p50/p99 ms':>15}"
            f" {'final p50/p99 ms':>17} {'backlog max':>11} {'drain s':>7} "
            + " ".join(f"{g[:12] + ' us':>15}" for g in groups) + f" {'xact/pay':>8}")
    print(head)
    for s in report["steps"]:
        tf, ack = s["time_to_final"], s["ack_latency"]
        sql = s["sql"] or {}
        print(f"{s['offered_rate']:8.0f} {s['send_rate']:7.0f} {s['accepted_per_s']:8.0f} {fmt(s['settled_per_s']):>8}"
              f" {fmt(s['drain_settled_per_s']):>7} {ack['p50_ms']:6.1f}/{ack['p99_ms']:8.1f}"
              f" {fmt(tf['p50_ms']):>7}/{fmt(tf['p99_ms']):>9} {s['backlog_max']:11d} {s['drain_s']:7.1f} "
              + " ".join(f"{fmt(s['cpu'][g]['cpu_us_per_payment']):>15}" for g in groups)
              + f" {fmt(sql.get('xacts_per_payment'), '.1f'):>8}"
              + ("  generator-limited" if s["generator_limited"] else "")
              + (f"  busy machine ({s['machine']['others_cores']} cores of other work)"
                 if s["machine"]["others_cores"] > 0.25 else "")
              + ("" if s["drained"] else f"  NOT DRAINED ({s['not_final_at_end']} not final)"))


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mode", choices=("embedded", "cluster"), default="embedded")
    ap.add_argument("--rates", help="offered creates/s, comma-separated (default 500,1000,2000; cluster 100,200)")
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--psp-time-scale", type=float, default=None,
                    help="simulated PSP durations x this (0: PSPs answer at once; default 1, --quick 0)")
    ap.add_argument("--cluster-workers", type=int, default=1, help="cluster mode: `gateway worker` processes")
    ap.add_argument("--warmup-seconds", type=float, default=2.0, help="unmeasured step at the lowest rate first")
    ap.add_argument("--drain-timeout-s", type=float, default=120.0)
    ap.add_argument("--out", type=Path, help="default bench/results/pipeline-<timestamp>")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and k6 to separate cores")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke: one low rate, 2 s step")
    args = ap.parse_args(argv)
    if args.quick:
        args.rates = args.rates or "50"
        args.step_seconds = 2.0
        args.warmup_seconds = 0.0
        args.drain_timeout_s = min(args.drain_timeout_s, 30.0)
        args.psp_time_scale = 0.0 if args.psp_time_scale is None else args.psp_time_scale
    args.rates = [float(r) for r in (args.rates or ("500,1000,2000" if args.mode == "embedded" else "100,200"))
                  .split(",")]
    args.psp_time_scale = 1.0 if args.psp_time_scale is None else args.psp_time_scale
    assert all(0 < r <= 100_000 for r in args.rates) and 0 < args.step_seconds <= 600
    assert 1 <= args.cluster_workers <= 16
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or BENCH / "results" / f"pipeline-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    k6 = hb.ensure_tools()
    os.environ["ACK_LOG"] = "1"  # k6_open_loop.js: one `ack <key> <ms>` line per 2xx answer (hb.run_step passes env)
    plan = hb.cpu_plan(os.cpu_count() or 1, args.no_pin)
    targets = work / "k6-targets.json"
    body = json.dumps({"amount": 2599, "currency": "USD", "payment_method": "tok_visa",
                       "customer": {"email": "buyer@example.com", "country": "US"}})
    targets.write_text(json.dumps([[0, i, body] for i in range(K6_TARGETS)]))
    system: Embedded | Cluster
    if args.mode == "embedded":
        system = Embedded(work, args.psp_time_scale, plan)
    else:
        system = Cluster(work, args.psp_time_scale, plan, args.cluster_workers)
    report: dict[str, Any] = {
        "when": stamp, "mode": args.mode, "machine": hb.machine_info(), "versions": hb.versions(),
        "config": {"rates": args.rates, "step_seconds": args.step_seconds, "psp_time_scale": args.psp_time_scale,
                   "cluster_workers": args.cluster_workers if args.mode == "cluster" else None,
                   "warmup_seconds": args.warmup_seconds, "drain_timeout_s": args.drain_timeout_s,
                   "cpu_plan": plan, "load_generator": "k6 (bench/k6_open_loop.js, ACK_LOG=1)", "body": body},
        "method": {
            "final": f"any status but {', '.join(NOT_FINAL)}",
            "accepted": "2xx answers (k6 status counts); time to final starts at the wall-clock time k6 logged",
            "settled_per_s": "payments made final in the store per second between the first and last 0.5 s "
                             "store samples inside the step's window (its first acknowledgement + step seconds); "
                             "drain_settled_per_s the same from the end of the load to the end of the drain",
            "kept_up": "drained, and the backlog never exceeded one second of acknowledgements (at least 10)",
            "time_to_final_resolution": f"the store is polled every >= {POLL_MIN_S * 1000:.0f} ms (more when a "
                                        f"poll is slow) for at most {POLL_KEYS_MAX} payments: the oldest not yet "
                                        "final and a rotating window over the rest",
            "cpu": "utime+stime of each live process of the group from step start to drain end, per "
                   "acknowledged payment of the step",
            "sql": ("pg_stat_database xact_commit+xact_rollback of the database (every session's, the harness's "
                    "own queries taken off) and pg_stat_user_tables of the run's schema; statements from "
                    "pg_stat_statements when installed" if args.mode == "cluster" else
                    "null: SQLite keeps no statement or transaction counters"),
            "steps": "each step is followed by a drain until every acknowledged payment is final",
        },
        "steps": [],
        "notes": [],
    }
    if args.mode == "embedded":
        report["notes"].append("embedded: `gateway serve` and its worker child share the server core(s) "
                               f"{plan['server_cpus']}; k6 and this harness run on {plan['generator_cpus']}")
    else:
        report["notes"].append("cluster: `gateway serve` is pinned to the server core(s); workers, psp-sim, "
                               "PostgreSQL, Kafka and Redis are not pinned (they may share k6's core)")
        report["notes"].append("postgres_auxiliary, redis and kafka CPU and pg_stat_database are per server: "
                               "other users of the same services count too")
    follower: Follower | None = None
    try:
        system.start()
        report["processes"] = system.procs.describe()
        if plan["generator_cpus"]:
            os.sched_setaffinity(0, hb.expand_cpus(plan["generator_cpus"]))
        follower = Follower(system.store)
        follower.start()
        harness = follower  # the follower's store counts its queries; so do the stats connection's
        run = uuid.uuid4().hex[:6]

        def harness_queries() -> int:
            own = harness.store.queries if harness.store is not None else 0
            return own + (system.stats_queries if isinstance(system, Cluster) else 0)

        if args.warmup_seconds > 0:
            run_step(system, follower, k6, targets, args.rates[0], args.warmup_seconds, f"{run}-warm", plan,
                     args.drain_timeout_s, harness_queries)
        sql_run0, h_run0 = system.sql_counters(), harness_queries()
        for rate in args.rates:
            step = run_step(system, follower, k6, targets, rate, args.step_seconds, f"{run}-{int(rate)}", plan,
                            args.drain_timeout_s, harness_queries)
            report["steps"].append(step)
            print(f"step {rate:g}/s: accepted {step['accepted_per_s']}/s settled {step['settled_per_s']}/s"
                  f" drained in {step['drain_s']} s", flush=True)
        if isinstance(system, Cluster) and sql_run0 is not None:
            # Whole-run SQL figures once PostgreSQL has flushed every backend's counters (the per-step
            # ones can miss the last second of an idle backend's work).
            time.sleep(PG_STATS_FLUSH_S)
            report["sql_whole_run"] = sql_per_payment(sql_run0, system.sql_counters(),
                                                      harness_queries() - h_run0,
                                                      sum(s["acknowledged"] for s in report["steps"]))
        report["poll_ms"] = percentiles([p * 1000 for p in follower.poll_s])
    finally:
        if follower is not None:
            follower.stop()
        system.stop()
    steps = report["steps"]
    report["totals"] = {
        "acknowledged": sum(s["acknowledged"] for s in steps),
        "final_at_end": sum(s["final_at_end"] for s in steps),
        "not_final_at_end": sum(s["not_final_at_end"] for s in steps),
        "all_final": all(s["drained"] and s["not_final_at_end"] == 0 for s in steps),
        "max_settled_per_s_kept_up": max((s["settled_per_s"] or 0 for s in steps if s["kept_up"]), default=None),
        "max_settled_per_s": max((s["settled_per_s"] or 0 for s in steps), default=None),
    }
    report["cannot_measure_yet"] = [
        "PSP utilisation per PSP: the simulator exposes no capacity yet (psp_calls per PSP is reported instead)",
        "SQL round trips per payment (no client-side counter); statements need pg_stat_statements"
        + (", not installed here" if not any((s["sql"] or {}).get("statements_per_payment") is not None
                                            for s in steps) else ""),
        "SQLite statements/transactions (embedded): SQLite keeps no counters",
    ]
    plots = write_plots(report, out) if steps else []
    if isinstance(plots, str):
        report["notes"].append(plots)
        plots = []
    report["plots"] = plots
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
