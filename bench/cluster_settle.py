"""How many payments per second the cluster workers settle (Kafka -> PostgreSQL -> PSP -> ledger), with
1 and with 2 `gateway worker` processes, against the real Kafka and PostgreSQL of deploy/.

Per run: a PostgreSQL schema, a Kafka topic (keyed by payment id, like the relay) and a consumer group
of its own (dropped afterwards). N `payment.created` records (auto-capture, so two PSP calls each) are
produced to the topic first; then the workers start, and the clock runs from the first settled payment
to the last (worker start-up, Kafka group join and the first batch are excluded; the total with them is
reported too). Every worker runs the in-process PSP simulator (`--time-scale 0`: it answers at once, so
the figure is the workers' own ceiling: Python, PostgreSQL transactions, claims; with auto-capture the
same worker makes both calls of a payment, so per-process simulators are consistent here).

    .venv/bin/python bench/cluster_settle.py --payments 4000 --workers 1,2 --time-scale 0

Results: printed, and bench/results/cluster_settle-<timestamp>.json (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

BENCH = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
MERCHANT = "acct_bench"
PARTITIONS = 4
SETTLE_TIMEOUT_S = 600


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_sample(workers: list[int]) -> dict[str, dict[int, float]]:
    """CPU seconds of each worker process and of each PostgreSQL server process (every backend of the
    server: the run's own are most of it, the harness's poll is in it too)."""
    postgres: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(b"postgres") and (c := _cpu_s(int(entry.name))):
                    postgres[int(entry.name)] = c
    return {"workers": {pid: c for pid in workers if (c := _cpu_s(pid)) is not None}, "postgres": postgres}


def _cpu_us_per_payment(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]],
                        payments: int) -> dict[str, float]:
    """CPU between two samples per payment, by group (a process born in between counts from zero)."""
    return {group: round(sum(c - before[group].get(pid, 0.0) for pid, c in after[group].items())
                         / payments * 1e6, 1) for group in after}


def services() -> dict[str, str]:
    out = subprocess.run(["bash", str(BENCH.parent / "deploy" / "services.sh"), "up"], capture_output=True,
                         text=True, check=True, timeout=900).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def run(svc: dict[str, str], payments: int, workers: int, time_scale: float, inflight: int) -> dict[str, object]:
    tag = uuid.uuid4().hex[:10]
    schema, topic = f"bs_{tag}", f"settle-{tag}"
    folder = Path(tempfile.mkdtemp(prefix="cluster-settle-"))
    config = folder / "cluster.toml"
    config.write_text(f"""
[server]
mode = "cluster"
[cluster]
redis_url = "{svc['REDIS_URL']}"
database_url = "{svc['DATABASE_URL']}"
database_schema = "{schema}"
kafka_bootstrap = "{svc['KAFKA_BOOTSTRAP']}"
topic = "{topic}"
topic_partitions = {PARTITIONS}
consumer_group = "settle-{tag}"
redis_key_prefix = "b{tag}"
""")
    gateway = str(VENV_BIN / "gateway")
    subprocess.run([gateway, "db", "migrate", "--config", str(config)], check=True, capture_output=True)
    with psycopg.connect(svc["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f"SET search_path = {schema}")  # type: ignore[arg-type]
        conn.execute("INSERT INTO merchants (id, name, api_key_hash, created) VALUES (%s, 'Bench', %s, 0)",
                     (MERCHANT, "0" * 64))
    from gateway.feed.relay import ensure_topic

    ensure_topic(svc["KAFKA_BOOTSTRAP"], topic, PARTITIONS)
    producer = Producer({"bootstrap.servers": svc["KAFKA_BOOTSTRAP"], "linger.ms": 5, "acks": "all"})
    now_s = int(time.time())
    for i in range(payments):
        pid = f"pay_{tag}{i:014d}"
        record = {"type": "payment.created", "merchant_id": MERCHANT, "status_code": 201, "created_ms": now_s * 1000,
                  "payment": {"id": pid, "object": "payment", "status": "processing", "amount": 1000 + i % 500,
                              "currency": "USD", "payment_method": "tok_visa", "capture": True, "created": now_s}}
        producer.produce(topic, msgspec.json.encode(record), key=pid.encode(), headers=[("lsn", str(i + 1).encode())])
        if i % 1000 == 999:
            producer.flush()
    producer.flush()
    env = {**os.environ, "GATEWAY_PSP_TIME_SCALE": str(time_scale), "GATEWAY_PSPS": "psp_a,psp_b",
           "GATEWAY_WORKER_INFLIGHT_MAX": str(inflight), "GATEWAY_LOG_LEVEL": "warning"}
    procs = []
    started = time.perf_counter()
    for n in range(workers):
        log = (folder / f"worker-{n}.log").open("ab")
        procs.append(subprocess.Popen([gateway, "worker", "--config", str(config)], stdout=log,
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True))
        log.close()
    first: float | None = None
    cpu_first: dict[str, dict[int, float]] = {}
    final_first = 0
    try:
        with psycopg.connect(svc["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f"SET search_path = {schema}")  # type: ignore[arg-type]
            while True:
                row = conn.execute("SELECT count(*) FILTER (WHERE status IN ('captured', 'failed')),"
                                   " count(*) FILTER (WHERE status = 'captured') FROM payments").fetchone()
                final, captured = (row[0], row[1]) if row else (0, 0)
                if final and first is None:
                    first = time.perf_counter()
                    cpu_first, final_first = _cpu_sample([p.pid for p in procs]), final
                if final >= payments:
                    break
                assert time.perf_counter() - started < SETTLE_TIMEOUT_S, f"only {final}/{payments} settled"
                # The count reads every row: polled every 100 ms (a load on the server beside the
                # workers), every 20 ms near the end so that the finish is timed within 20 ms.
                time.sleep(0.02 if final >= 0.95 * payments else 0.1)
        done = time.perf_counter()
        cpu_done = _cpu_sample([p.pid for p in procs])
        check = subprocess.run([gateway, "ledger", "check", "--config", str(config)], capture_output=True,
                               text=True, check=False)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(svc["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            AdminClient({"bootstrap.servers": svc["KAFKA_BOOTSTRAP"]}).delete_topics([topic])[topic].result(30)
    assert first is not None
    steady = done - first
    return {
        "workers": workers,
        "payments": payments,
        "captured": captured,
        "time_scale": time_scale,
        "inflight_max": inflight,
        "elapsed_s": round(steady, 3),
        "elapsed_with_startup_s": round(done - started, 3),
        "payments_per_s": round(payments / steady, 1),
        "psp_calls_per_payment": 2,
        # From the first settled payment to the last, as payments_per_s; /proc of this machine.
        "cpu_us_per_payment": _cpu_us_per_payment(cpu_first, cpu_done, payments - final_first),
        "ledger_check": check.stdout.strip() or check.stderr.strip(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--payments", type=int, default=4000)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, one run each")
    ap.add_argument("--time-scale", type=float, default=0.0)
    ap.add_argument("--inflight", type=int, default=64)
    args = ap.parse_args()
    assert 1 <= args.payments <= 1_000_000
    svc = services()
    results = [run(svc, args.payments, int(w), args.time_scale, args.inflight) for w in args.workers.split(",")]
    for r in results:
        print(f"{r['workers']} worker(s): {r['payments']} payments authorized+captured in {r['elapsed_s']} s"
              f" = {r['payments_per_s']} payments/s, CPU us/payment {r['cpu_us_per_payment']}"
              f" ({r['captured']} captured; with start-up"
              f" {r['elapsed_with_startup_s']} s; {r['ledger_check']})")
    out = BENCH / "results" / f"cluster_settle-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
