"""Cluster-mode benchmark: P50/P99/P99.9 and achieved requests/s at steady offered rates, for the
durability modes (`wal`: 2xx after the local fsync; `kafka`: also after the broker's ack;
`replicated`: after a quorum of brokers acked, the local fsync behind), side by side in one run, on
the same machine, against the real Redis, Kafka and PostgreSQL of deploy/. By default Kafka is the
three-node cluster of `KAFKA_BROKERS=3 deploy/kafka.sh` and every mode's topic has replication factor
3 and min.insync.replicas 2 (`--brokers 1`: the single node, without `replicated`).

Every step reports the fsync latency of the same seconds, two ways: the gateways' own WAL fsync
histogram (`wal_fsync`: P50/P99/max as bucket bounds) and a probe thread fdatasyncing 4 KiB every 5 ms
on the same disk (`disk_fsync_probe`: exact P50/P99/max, and how many took over 100 ms). A disk that
does not stall during the run can be made to: `--fsync-stall-ms 200` holds one WAL fsync per
`--fsync-stall-every-ms` (2000) back by 200 ms in every gateway (GATEWAY_FAULT_WAL_FSYNC_DELAY_MS);
the report says so (`injected_fsync_stall_ms`).

Per mode: `gateway serve` with two processes behind one port, one `gateway worker`, a PostgreSQL schema,
Kafka topic and Redis prefix of its own (dropped afterwards). The worker processes every payment
(PSP simulator at its real latency), so the figures are those of the whole pipeline sharing the
machine. Load comes from k6 (constant arrival rate, latency from each request's intended send time;
`--generator python` uses an asyncio + httpx client instead, which saturates its own core within a
few hundred requests/s once latencies grow); every request has a fresh Idempotency-Key. After the
run the script checks that every 2xx payment reached PostgreSQL.

    python bench/cluster_bench.py                       # rates 250,500,1000 req/s, 5 s each
    python bench/cluster_bench.py --rates 500 --step-seconds 20 --processing off --fsync-stall-ms 200
    python bench/cluster_bench.py --rates 500 --step-seconds 10
    python bench/cluster_bench.py --modes wal --velocity shared,local   # shared vs local velocity
    python bench/cluster_bench.py --admit-only 20000    # the admission script alone, with and without
                                                        # velocity: P50/P99 of one call, no gateway

Results: printed, and bench/results/cluster-<timestamp>.json (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from confluent_kafka.admin import AdminClient
from fsync_stats import FsyncProbe, gateway_fsync_histogram, histogram_delta
from gateway.config import ClusterConfig
from pipeline import Processes, cmdline, cpu_delta, descendants

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_BIN = Path(sys.executable).parent

OK_STATUSES = "200,201"
DEMO_KEY = "sk_test_demo"
# k6 cycles through the targets with keys unique to the step and the wrap-around.
K6_TARGETS = 10_000
K6_VUS_MAX = 2_000
# The relay's linger ([cluster] relay_linger_ms default), used by the broker floor too.
RELAY_LINGER_MS = ClusterConfig().relay_linger_ms
# Seconds of no load after the warm-up, whose CPU shows what the deployment costs at rest.
IDLE_SAMPLE_S = 3.0
BODY = json.dumps({"amount": 2599, "currency": "USD", "payment_method": "tok_visa",
                   "customer": {"email": "buyer@example.com", "country": "US"}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def run_step_python(port: int, rate: float, seconds: float, run_id: str) -> dict[str, Any]:
    """Open loop in asyncio: request i is due at start + i/rate whatever the server does, and its
    latency counts from that due time (coordinated omission corrected)."""
    import asyncio

    async def go() -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}/v1/payments"
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        lat: list[float] = []
        statuses: dict[str, int] = {}
        errors = 0
        async with httpx.AsyncClient(timeout=5, limits=limits) as client:
            async def one(i: int, due: float) -> None:
                nonlocal errors
                try:
                    r = await client.post(url, content=BODY, headers={
                        "Authorization": f"Bearer {DEMO_KEY}", "Content-Type": "application/json",
                        "Idempotency-Key": f"bench-{run_id}k{i}"})
                    statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                    if r.status_code not in (200, 201):
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append((time.perf_counter() - due) * 1000)

            n = int(rate * seconds)
            start = time.perf_counter()
            tasks = []
            for i in range(n):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, due)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
        lat.sort()
        pct = {"p50_ms": _percentile(lat, 0.5), "p99_ms": _percentile(lat, 0.99),
               "p999_ms": _percentile(lat, 0.999), "max_ms": lat[-1] if lat else 0.0}
        return {"achieved_rate": (n - errors) / elapsed, "error_rate": errors / max(1, n),
                "status_counts": statuses, "latency_corrected": pct}

    return asyncio.run(go())


def run_step_k6(port: int, rate: float, seconds: float, run_id: str, work: Path) -> dict[str, Any]:
    """One offered rate with k6 (constant-arrival-rate, latency from the intended send time), the
    generator of bench/http_bench.py: a compiled client keeps offering the rate where a Python client
    spends its own core on connection-pool bookkeeping once latencies grow."""
    sys.path.insert(0, str(BENCH))
    import http_bench as hb

    k6 = hb.ensure_tools()
    targets = work / "k6-targets.json"
    if not targets.exists():
        body = BODY.decode() if isinstance(BODY, bytes) else BODY
        targets.write_text(json.dumps([[0, i, body] for i in range(K6_TARGETS)]))
    run_id = run_id.replace("/", "-")  # names files
    return hb.run_step(k6, targets, port, rate, seconds, run_id, None, None, K6_VUS_MAX, [DEMO_KEY], work)


def pids_matching(needle: str) -> list[int]:
    """Live processes whose command line contains `needle`."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and needle in cmdline(int(e.name))]


def cpu_groups(d: Deployment) -> Processes:
    """The processes whose CPU a step reports: the gateway's HTTP processes (the supervisor and its
    children), the worker, the Kafka brokers, Redis and PostgreSQL (every process of each server)."""
    procs = Processes()
    serve, worker = d.procs[0].pid, d.procs[1].pid
    procs.add("gateway_http", lambda: [serve, *descendants(serve)])
    procs.add("worker", lambda: [worker, *descendants(worker)])
    procs.add("kafka", lambda: pids_matching("kafka.Kafka"))
    procs.add("redis", lambda: pids_matching("redis-server"))
    procs.add("postgres", lambda: pids_matching("postgres"))
    return procs


def cpu_report(procs: Processes, before: dict[str, dict[int, float]], seconds: float,
               requests: int) -> dict[str, Any]:
    """Cores each group kept busy over `seconds`, and CPU ms per answered request."""
    after = procs.cpu()
    used = {name: cpu_delta(before.get(name, {}), pids) for name, pids in after.items()}
    return {"cores": {n: round(v / seconds, 3) for n, v in used.items()},
            "cpu_ms_per_request": {n: round(v / max(1, requests) * 1000, 3) for n, v in used.items()}}


def broker_floor(bootstrap: str, replicas: int, rate: float, seconds: float, linger_ms: int) -> dict[str, Any]:
    """The brokers' own floor at `rate`: a bare producer with the relay's settings (idempotent,
    acks=all, the same linger) sending records of a create's size, open loop, to a topic with the
    benchmark's replication, and each record's time from its due time to its acknowledgement. What
    durability "replicated" adds above it is the gateway's."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import NewTopic
    from gateway.feed.eventlog import producer_config

    topic = f"bench-floor-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=replicas, config={
        "min.insync.replicas": str(2 if replicas >= 3 else 1)})])[topic].result(timeout=30)
    producer = Producer(producer_config(bootstrap, linger_ms=linger_ms, message_timeout_ms=10_000,
                                        inflight_records_max=10_000))
    lat: list[float] = []
    failed = 0
    payload = b"x" * 600  # about a payment.created record

    def delivered(due: float, err: Any) -> None:
        nonlocal failed
        if err is not None:
            failed += 1
        else:
            lat.append((time.perf_counter() - due) * 1000)
    try:
        for i in range(50):  # metadata and the producer id before the clock starts
            producer.produce(topic, payload, key=str(i).encode())
        producer.flush(30)
        n = int(rate * seconds)
        start = time.perf_counter()
        for i in range(n):
            due = start + i / rate
            while (wait := due - time.perf_counter()) > 0:
                producer.poll(min(wait, 0.0005))
            producer.produce(topic, payload, key=uuid.uuid4().bytes,
                             on_delivery=lambda err, _msg, due=due: delivered(due, err))
            producer.poll(0)
        producer.flush(30)
    finally:
        admin.delete_topics([topic])
    lat.sort()
    return {"records": n, "failed": failed, "p50_ms": round(_percentile(lat, 0.5), 3),
            "p99_ms": round(_percentile(lat, 0.99), 3), "p999_ms": round(_percentile(lat, 0.999), 3),
            "max_ms": round(lat[-1], 3) if lat else None}


def services(brokers: int = 1) -> dict[str, str]:
    """The services of deploy/ (started if needed); with `brokers` 3 KAFKA_BOOTSTRAP names the three
    nodes of `KAFKA_BROKERS=3 deploy/kafka.sh` (started too)."""
    # services.sh prints the ports it chose for this checkout (another checkout may hold the defaults),
    # KAFKA_BOOTSTRAP included: with KAFKA_BROKERS=3 it names the three nodes.
    out = subprocess.run(["bash", str(REPO / "deploy" / "services.sh"), "up"], capture_output=True, text=True,
                         check=True, timeout=900, env={**os.environ, "KAFKA_BROKERS": str(brokers)}).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class Deployment:
    def __init__(self, svc: dict[str, str], durability: str, workdir: Path, workers: int,
                 velocity: str = "shared", processing: bool = True, replicas: int = 1,
                 gateway_env: dict[str, str] | None = None, relay_linger_ms: int = RELAY_LINGER_MS) -> None:
        # processing False: the worker only materialises payments into PostgreSQL (GATEWAY_WORKER=off),
        # so the figures are those of the request path with the machine to itself.
        self.processing = processing
        self.gateway_env = gateway_env or {}
        tag = uuid.uuid4().hex[:8]
        self.svc = svc
        self.schema = f"bench_{tag}"
        self.topic = f"bench-{tag}"
        self.prefix = f"b{tag}"
        self.port = free_port()
        self.dir = workdir / f"{durability}-{velocity}"
        self.dir.mkdir(parents=True)
        self.config = self.dir / "cluster.toml"
        self.config.write_text(f"""
[server]
mode = "cluster"
workers = {workers}
[rate_limit]
per_s = 1000000.0
burst = 1000000.0
[log]
level = "warning"
[cluster]
redis_url = "{svc['REDIS_URL']}"
database_url = "{svc['DATABASE_URL']}"
database_schema = "{self.schema}"
kafka_bootstrap = "{svc['KAFKA_BOOTSTRAP']}"
topic = "{self.topic}"
consumer_group = "bench-{tag}"
redis_key_prefix = "{self.prefix}"
durability = "{durability}"
velocity = "{velocity}"
topic_replication_factor = {replicas}
topic_min_insync_replicas = {2 if replicas >= 3 else 1}
relay_linger_ms = {relay_linger_ms}
""")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers = workers

    def start(self) -> None:
        gw = VENV_BIN / "gateway"
        log = (self.dir / "gateway.log").open("ab")
        self.procs.append(subprocess.Popen(
            [str(gw), "serve", "--config", str(self.config), "--data-dir", str(self.dir / "data"),
             "--port", str(self.port), "--demo"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.gateway_env}))
        wlog = (self.dir / "worker.log").open("ab")
        env = {**os.environ, "GATEWAY_WORKER": "on" if self.processing else "off"}
        self.procs.append(subprocess.Popen([str(gw), "worker", "--config", str(self.config)], stdout=wlog,
                                           stderr=subprocess.STDOUT, start_new_session=True, env=env))
        seen: set[str] = set()
        deadline = time.monotonic() + 90
        while len(seen) < self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready: {(self.dir / 'gateway.log').read_text()[-2000:]}")
            try:
                with httpx.Client(timeout=2) as c:
                    seen.update(re.findall(r"^gateway_cluster_slot (\d+)$",
                                           c.get(f"http://127.0.0.1:{self.port}/metrics").text, re.MULTILINE))
            except httpx.HTTPError:
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def payments_in_postgres(self) -> int:
        with psycopg.connect(self.svc["DATABASE_URL"], autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM {self.schema}.payments").fetchone()
        return int(row[0]) if row else 0

    def cleanup(self) -> None:
        with psycopg.connect(self.svc["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        admin = AdminClient({"bootstrap.servers": self.svc["KAFKA_BOOTSTRAP"]})
        try:
            admin.delete_topics([self.topic])[self.topic].result(timeout=30)
        except Exception as e:  # noqa: BLE001 - cleanup is best effort
            print(f"note: topic {self.topic} not deleted: {e}", file=sys.stderr)
        r = redis.Redis.from_url(self.svc["REDIS_URL"])
        keys = list(r.scan_iter(f"{self.prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])
        r.close()


def admit_only(svc: dict[str, str], calls: int) -> dict[str, Any]:
    """P50/P99/P99.9 of one admission round trip (sequential, one connection), without and with the
    shared velocity update, against the same Redis; cards cycle through 1000 values, the merchant is one."""
    import asyncio

    from gateway._fastpath import RiskEngine
    from gateway.shared.redis_state import RedisSharedState
    from gateway.shared.redis_velocity import VelocityEvent

    engine = RiskEngine()
    events = [VelocityEvent.from_fastpath(engine.velocity_event_json(json.dumps({
        "merchant_id": "acct_bench", "amount": 2599, "currency": "USD", "card": f"tok_{i}",
        "email": f"b{i % 300}@example.com", "ip": f"10.0.{i % 7}.1", "device_id": f"dev_{i % 500}"})))
        for i in range(1000)]
    prefix = f"ba{uuid.uuid4().hex[:8]}"

    async def go() -> dict[str, Any]:
        state = RedisSharedState(svc["REDIS_URL"], prefix, 4, 1000, 3600, 60)
        out: dict[str, Any] = {}
        try:
            # The last: a keyed create's two calls (admit, then finish caching the answer), as the
            # gateway makes them; `client_cpu_us` is this process's CPU per call (or per pair).
            for name in ("admit", "admit+velocity", "admit+finish"):
                lat: list[float] = []
                cpu0 = time.process_time()
                for i in range(calls):
                    ev = events[i % len(events)] if name == "admit+velocity" else None
                    key = f"k{i}" if name == "admit+finish" else None
                    t = time.perf_counter()
                    adm = await state.admit("acct_bench", key, "fp", 1e9, 1e9, 10_000, velocity=ev)
                    if key is not None:
                        await state.finish("acct_bench", key, "fp", 201, b"{}" * 200, f"pay_{i}", cache=True)
                    lat.append((time.perf_counter() - t) * 1000)
                    assert adm.kind == "ok"
                cpu_us = (time.process_time() - cpu0) / calls * 1e6
                lat.sort()
                out[name] = {"calls": calls, "p50_ms": round(_percentile(lat, 0.5), 4),
                             "p99_ms": round(_percentile(lat, 0.99), 4),
                             "p999_ms": round(_percentile(lat, 0.999), 4), "client_cpu_us": round(cpu_us, 1)}
                print(f"{name:15} p50 {out[name]['p50_ms']:.3f} ms  p99 {out[name]['p99_ms']:.3f} ms  "
                      f"p99.9 {out[name]['p999_ms']:.3f} ms  client CPU {cpu_us:.1f} us  ({calls} sequential calls)",
                      flush=True)
            info = await state.redis.info("commandstats")
            for cmd in ("cmdstat_evalsha",):
                if cmd in info:
                    out["redis_" + cmd] = info[cmd]
        finally:
            keys = [k async for k in state.redis.scan_iter(f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await state.redis.delete(*keys[i:i + 1000])
            await state.close()
        return out

    return asyncio.run(go())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="250,500,1000", help="offered rates, requests per second")
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--modes", default="wal,kafka,replicated")
    ap.add_argument("--brokers", type=int, choices=(1, 3), default=3,
                    help="Kafka nodes: 3 (replication factor 3, min.insync.replicas 2) or the single node")
    ap.add_argument("--fsync-stall-ms", type=int, default=0,
                    help="inject WAL fsync stalls of this many ms into the gateways (0: only the disk's own)")
    ap.add_argument("--fsync-stall-every-ms", type=int, default=2000, help="one injected stall per this period")
    ap.add_argument("--workers", type=int, default=2, help="gateway processes behind the port")
    ap.add_argument("--generator", choices=("k6", "python"), default="k6",
                    help="load generator: k6 (bench/tools.sh) or the asyncio + httpx client")
    ap.add_argument("--processing", choices=("on", "off"), default="on",
                    help="off: the worker only writes payments to PostgreSQL (no PSP calls, no ledger)")
    ap.add_argument("--velocity", default="shared", help="cluster.velocity values to run: shared, local")
    ap.add_argument("--broker-floor", action=argparse.BooleanOptionalAction, default=True,
                    help="after each replicated step, the brokers' own floor: a bare producer at the same rate")
    ap.add_argument("--relay-linger-ms", type=int, default=RELAY_LINGER_MS,
                    help="[cluster] relay_linger_ms of the gateways (and the broker floor)")
    ap.add_argument("--admit-only", type=int, default=0, metavar="CALLS",
                    help="only time the Redis admission script, with and without velocity")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if args.brokers == 1 and "replicated" in args.modes.split(","):
        ap.error("durability replicated needs --brokers 3")
    svc = services(args.brokers)
    gateway_env = ({"GATEWAY_FAULT_WAL_FSYNC_DELAY_MS": str(args.fsync_stall_ms),
                    "GATEWAY_FAULT_WAL_FSYNC_EVERY_MS": str(args.fsync_stall_every_ms)}
                   if args.fsync_stall_ms else {})
    if args.admit_only:
        result = admit_only(svc, args.admit_only)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = BENCH / "results" / f"cluster-admit-{stamp}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"report: {out}")
        return 0
    velocities = args.velocity.split(",")
    # Several velocity settings: the report's modes are "<durability>/<velocity>".
    runs = [(m, v, m if len(velocities) == 1 else f"{m}/{v}") for m in args.modes.split(",") for v in velocities]
    generator = ("k6 (constant arrival rate, latency from intended send time)" if args.generator == "k6"
                 else "asyncio + httpx (Python, open loop, latency from intended send time)")
    print(f"load generator: {generator}", flush=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "when": stamp, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "gateway_processes": args.workers, "kafka_workers": 1, "step_seconds": args.step_seconds,
        "load_generator": generator, "processing": args.processing, "kafka_brokers": args.brokers,
        "topic_replication_factor": args.brokers, "topic_min_insync_replicas": 2 if args.brokers == 3 else 1,
        "injected_fsync_stall_ms": args.fsync_stall_ms,
        "injected_fsync_stall_every_ms": args.fsync_stall_every_ms if args.fsync_stall_ms else None,
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        for mode, velocity, name in runs:
            d = Deployment(svc, mode, Path(tmp), args.workers, velocity, args.processing == "on",
                           replicas=args.brokers, gateway_env=gateway_env, relay_linger_ms=args.relay_linger_ms)
            try:
                d.start()
                def step(rate: float, seconds: float, run_id: str, d: Deployment = d) -> dict[str, Any]:
                    if args.generator == "python":
                        return run_step_python(d.port, rate, seconds, run_id)
                    return run_step_k6(d.port, rate, seconds, run_id, d.dir)

                step(rates[0], 5.0, f"{name}-warm")  # the first seconds of a deployment are slower
                procs = cpu_groups(d)
                # What the deployment costs with no request at all (heartbeats, polls, replica fetches).
                before_idle = procs.cpu()
                time.sleep(IDLE_SAMPLE_S)
                idle_cores = cpu_report(procs, before_idle, IDLE_SAMPLE_S, 0)["cores"]
                print(f"{name:12} at rest, cores busy " + ", ".join(f"{k} {v:.2f}" for k, v in idle_cores.items()),
                      flush=True)
                steps = []
                url = f"http://127.0.0.1:{d.port}"
                for rate in rates:
                    before = gateway_fsync_histogram(url, args.workers)
                    cpu_before = procs.cpu()
                    started = time.monotonic()
                    with FsyncProbe(d.dir) as probe:
                        r = step(rate, args.step_seconds, f"{name}-{int(rate)}")
                    answered = sum(r["status_counts"].values())
                    cpu = cpu_report(procs, cpu_before, time.monotonic() - started, answered)
                    wal_fsync = histogram_delta(before, gateway_fsync_histogram(url, args.workers))
                    steps.append({
                        "wal_fsync": wal_fsync, "disk_fsync_probe": probe.summary(),
                        "offered_rate": rate, "achieved_rate": round(r["achieved_rate"], 1),
                        "error_rate": r["error_rate"], "status_counts": r["status_counts"],
                        "p50_ms": r["latency_corrected"]["p50_ms"], "p99_ms": r["latency_corrected"]["p99_ms"],
                        "p999_ms": r["latency_corrected"]["p999_ms"], "max_ms": r["latency_corrected"]["max_ms"],
                        "cores_busy": cpu["cores"], "cpu_ms_per_request": cpu["cpu_ms_per_request"],
                    })
                    print(f"{name:12} offered {rate:7.0f}/s achieved {r['achieved_rate']:8.1f}/s "
                          f"p50 {r['latency_corrected']['p50_ms']:7.2f} ms p99 {r['latency_corrected']['p99_ms']:7.2f}"
                          f" ms p99.9 {r['latency_corrected']['p999_ms']:7.2f} ms errors {r['error_rate']:.4f}",
                          flush=True)
                    pr = probe.summary()
                    print(f"{'':12} WAL fsync p99 <= {wal_fsync.get('p99_ms_le')} ms, max <= {wal_fsync.get('max_ms_le')}"
                          f" ms ({wal_fsync.get('over_100ms', 0)} over 100 ms); disk probe p99 {pr['p99_ms']} ms,"
                          f" max {pr['max_ms']} ms ({pr['over_100ms']} over 100 ms)", flush=True)
                    if args.broker_floor and mode == "replicated":
                        floor = broker_floor(svc["KAFKA_BOOTSTRAP"], args.brokers, rate, args.step_seconds,
                                             args.relay_linger_ms)
                        steps[-1]["broker_floor"] = floor
                        print(f"{'':12} broker floor (bare producer, acks=all, same rate): p50 {floor['p50_ms']} ms"
                              f" p99 {floor['p99_ms']} ms p99.9 {floor['p999_ms']} ms max {floor['max_ms']} ms",
                              flush=True)
                    print(f"{'':12} CPU ms/request " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                              cpu["cpu_ms_per_request"].items())
                          + "; cores busy " + ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items()), flush=True)
                acked = sum(s["status_counts"].get("201", 0) for s in steps)
                deadline = time.monotonic() + 60
                while (in_pg := d.payments_in_postgres()) < acked and time.monotonic() < deadline:
                    time.sleep(0.5)
                report["modes"][name] = {"velocity": velocity, "idle_cores_busy": idle_cores, "steps": steps,
                                         "acknowledged_in_steps": acked,
                                         "payments_in_postgres": in_pg}
            finally:
                d.stop()
                d.cleanup()
    out = BENCH / "results" / f"cluster-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    names = [name for _, _, name in runs]
    print(f"\nside by side, same run ({args.workers} gateway processes, 1 worker):")
    print("(each cell: P50/P99 ms of the creates, and the longest WAL fsync of the same step, ms)")
    print(f"{'rate':>8} | " + " | ".join(f"{n + ' p50/p99 [fsync max]':>32}" for n in names))
    for i, rate in enumerate(rates):
        cells = []
        for name in names:
            s = report["modes"].get(name, {}).get("steps", [])
            cells.append(f"{s[i]['p50_ms']:7.2f}/{s[i]['p99_ms']:8.2f} [<={s[i]['wal_fsync'].get('max_ms_le')}]"
                         if i < len(s) else "-")
        print(f"{rate:8.0f} | " + " | ".join(f"{c:>32}" for c in cells))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
