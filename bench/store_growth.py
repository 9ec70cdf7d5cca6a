"""Store growth per payment: bytes per table in SQLite (embedded) and PostgreSQL (cluster).

A real embedded gateway (worker on, PSP simulator at `--time-scale`) takes `--payments` keyed creates
over HTTP, half of them captured automatically and the rest left authorized, a tenth of the captured
ones refunded in part; once every payment is final the gateway stops and SQLite's `dbstat` gives the
bytes of every table and index. With `--database-url` the same rows are copied into a throw-away
PostgreSQL schema migrated by the gateway, and `pg_total_relation_size` gives its bytes (heap, TOAST
and indexes). Bytes per payment = table bytes / payments. A JSON report goes to bench/results/.

    python bench/store_growth.py --payments 3000 --database-url postgresql://gateway:gateway@127.0.0.1:15432/gateway
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from bench_common import save_report

GATEWAY = str(Path(sys.executable).parent / "gateway")
AUTH = {"Authorization": "Bearer sk_test_demo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(data_dir: Path, payments: int, time_scale: float) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([GATEWAY, "serve", "--data-dir", str(data_dir), "--port", str(port), "--demo"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "GATEWAY_PSP_TIME_SCALE": str(time_scale)})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway not ready"
            time.sleep(0.05)
        with httpx.Client(timeout=30) as c:
            ids = []
            for i in range(payments):
                body = {"amount": 1000 + i, "currency": "USD", "payment_method": "tok_visa", "capture": i % 2 == 0,
                        "description": "order", "metadata": {"order_id": f"o{i}"},
                        "customer": {"email": f"b{i}@example.com", "ip": "203.0.113.7", "country": "US"}}
                r = c.post(f"{url}/v1/payments", json=body, headers={**AUTH, "Idempotency-Key": uuid.uuid4().hex})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            for pid in ids:
                while c.get(f"{url}/v1/payments/{pid}", headers=AUTH).json()["status"] == "processing":
                    time.sleep(0.05)
            for pid in ids[::20]:
                if c.get(f"{url}/v1/payments/{pid}", headers=AUTH).json()["status"] == "captured":
                    c.post(f"{url}/v1/payments/{pid}/refunds", json={"amount": 100},
                           headers={**AUTH, "Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=5000"})
        time.sleep(2)  # webhooks/events of the last changes
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def sqlite_bytes(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT tbl_name, sum(pgsize) FROM dbstat JOIN sqlite_master USING (name)"
                            " GROUP BY tbl_name").fetchall()
    return {name: int(size) for name, size in rows}


def postgres_bytes(db: Path, dsn: str) -> dict[str, int]:
    import psycopg
    from gateway.store.postgres import PostgresStore

    store = PostgresStore(dsn, f"growth_{uuid.uuid4().hex[:10]}")
    store.migrate()
    try:
        with sqlite3.connect(db) as src, psycopg.connect(dsn, autocommit=True) as pg:
            pg.execute(f"SET search_path = {store.schema}")
            # In creation order, so that every foreign key finds its row.
            tables = [r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                                " AND name NOT LIKE 'sqlite_%' AND name <> 'schema_version'"
                                                " ORDER BY rowid")]
            for t in tables:
                cur = src.execute(f"SELECT * FROM {t}")
                cols = [d[0] for d in cur.description]
                rows = cur.fetchall()
                if not rows:
                    continue
                pg.execute(f"DELETE FROM {t}")
                with pg.cursor() as pc, pc.copy(f"COPY {t} ({', '.join(cols)}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
            out = {}
            for t in tables:
                size = pg.execute("SELECT pg_total_relation_size(%s)", (f"{store.schema}.{t}",)).fetchone()
                out[t] = int(size[0]) if size else 0
        return out
    finally:
        store.drop_schema()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payments", type=int, default=3000)
    ap.add_argument("--time-scale", type=float, default=0.01, help="PSP simulator durations x this")
    ap.add_argument("--database-url", help="also measure PostgreSQL (a throw-away schema)")
    args = ap.parse_args()
    if not 100 <= args.payments <= 1_000_000:
        ap.error("--payments must be 100..1000000")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        fill(data_dir, args.payments, args.time_scale)
        db = data_dir / "gateway.db"
        report: dict[str, object] = {"payments": args.payments, "sqlite": sqlite_bytes(db),
                                     "wal_bytes": sum(f.stat().st_size for f in (data_dir / "wal").glob("*.wal"))}
        if args.database_url:
            report["postgres"] = postgres_bytes(db, args.database_url)
    n = args.payments
    for backend in ("sqlite", "postgres"):
        sizes = report.get(backend)
        if not isinstance(sizes, dict):
            continue
        total = sum(sizes.values())
        print(f"{backend}: {total / n:.0f} bytes per payment in all; by table:")
        for t, b in sorted(sizes.items(), key=lambda kv: -kv[1]):
            if b / n >= 1:
                print(f"  {t:32} {b / n:8.0f}")
    print(f"WAL: {int(report['wal_bytes']) / n:.0f} bytes per payment")  # type: ignore[call-overload]
    out = save_report("store_growth", report)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
