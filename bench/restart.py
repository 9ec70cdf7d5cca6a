"""Restart time against history size: `gateway serve` to a 200 from /readyz, embedded mode.

For each size the history is written fast, without HTTP: the fast path itself (`FastPath`, the same
config the server uses) accepts N keyed payments of the demo merchant into the WAL, and the store's
own `apply_wal_records` materialises them into SQLite with the checkpoint, as the worker's tailer
does. Then the real server is started (worker off, so the restart itself is measured, not the
processing of a million payments left `processing`), SIGTERMed and started again, `--runs` times, and
the time to /readyz is printed with the WAL, filter and SQLite sizes. `--tail N` leaves the last N
records un-checkpointed, so recovery has something to replay. A JSON report goes to bench/results/.

    python bench/restart.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import save_report
from gateway import config as config_mod
from gateway._fastpath import FastPath, WalReader
from gateway.cli import DEMO_MERCHANT_ID, ensure_demo_merchant
from gateway.store.sqlite import SqliteStore

GATEWAY = str(Path(sys.executable).parent / "gateway")
CONFIG = """
[rate_limit]
per_s = 1000000000.0
burst = 1000000000.0
[wal]
batch_records_max = 4096
pending_records_max = 1000000
[worker]
enabled = false
"""
BATCH = 5000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def write_history(data_dir: Path, config_path: Path, n: int, tail: int) -> dict[str, float]:
    """N keyed payments through the fast path, all but the last `tail` materialised into SQLite."""
    cfg = config_mod.load(str(config_path))
    ensure_demo_merchant(data_dir, cfg)
    store = SqliteStore(data_dir / "gateway.db")
    store.migrate()
    fp = FastPath(cfg.fastpath_json(data_dir, recover_after_lsn=store.checkpoint(), key_filter=True))
    started = time.perf_counter()
    last = 0
    for i in range(n):
        body = b'{"amount": %d, "currency": "USD", "payment_method": "tok_visa"}' % (100 + i % 100_000)
        retried = False
        while True:
            # A key retried after a 503 is in the key filter already: the store (empty for it) decides.
            r = fp.create_payment(DEMO_MERCHANT_ID, f"hist-{i}", body, checked=retried)
            if r.check_durable:
                # A filter false positive: every key here is new, the store holds none of them.
                r = fp.create_payment(DEMO_MERCHANT_ID, f"hist-{i}", body, checked=True)
            if r.status != 503:
                break
            retried = True
            fp.wait_committed(last, 5000)
        assert r.status == 201, (i, r.status, r.body, retried)
        last = r.lsn
    assert fp.wait_committed(last, 60_000)
    fp.close()
    appended = time.perf_counter()
    reader = WalReader(str(data_dir / "wal"), store.checkpoint())
    upto = last - tail
    while True:
        records = [r for r in reader.read(upto, BATCH)]
        if not records:
            break
        store.apply_wal_records(records)
    store.close()
    return {"append_s": round(appended - started, 1), "materialise_s": round(time.perf_counter() - appended, 1)}


def time_to_ready(data_dir: Path, config_path: Path, port: int, log_path: Path) -> float:
    args = [GATEWAY, "serve", "--data-dir", str(data_dir), "--port", str(port), "--config", str(config_path)]
    with log_path.open("ab") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "GATEWAY_WORKER": "off"})
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited early, see {log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def run(n: int, runs: int, tail: int, root: Path) -> dict[str, object]:
    data_dir = root / f"history-{n}"
    config_path = root / "gateway.toml"
    config_path.write_text(CONFIG)
    fresh = n and not (data_dir / "gateway.db").exists()  # a kept history (--dir) is measured again
    built = write_history(data_dir, config_path, n, tail) if fresh else {"append_s": 0.0, "materialise_s": 0.0}
    port = _free_port()
    times = [time_to_ready(data_dir, config_path, port, root / f"gateway-{n}.log") for _ in range(runs)]
    return {
        "payments": n,
        "uncheckpointed_tail_records": tail if n else 0,
        "restart_to_ready_s": [round(t, 3) for t in times],
        "restart_to_ready_s_median": round(statistics.median(times), 3),
        "wal_bytes": _dir_bytes(data_dir / "wal"),
        "filter_bytes": _dir_bytes(data_dir / "idempotency"),
        "sqlite_bytes": _dir_bytes(data_dir) - _dir_bytes(data_dir / "wal") - _dir_bytes(data_dir / "idempotency"),
        **built,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0,100000,1000000", help="payments of history, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="restarts measured per size")
    ap.add_argument("--tail", type=int, default=1000, help="records left un-checkpointed (replayed at start)")
    ap.add_argument("--dir", help="where the histories are written and kept (default: a temporary folder,"
                                  " removed afterwards)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(not 0 <= s <= 10_000_000 for s in sizes) or not 1 <= args.runs <= 20:
        ap.error("sizes must be 0..10000000 and runs 1..20")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.dir) if args.dir else Path(scratch)
        results = []
        for n in sizes:
            r = run(n, args.runs, min(args.tail, n), root)
            results.append(r)
            print(f"{n:>9} payments: restart to /readyz {r['restart_to_ready_s_median']} s (runs {r['restart_to_ready_s']});"
                  f" WAL {r['wal_bytes'] / 1e6:.1f} MB, SQLite {r['sqlite_bytes'] / 1e6:.1f} MB,"
                  f" filter {r['filter_bytes'] / 1e6:.2f} MB; history written in {r['append_s']} s"
                  f" + materialised in {r['materialise_s']} s", flush=True)
    report = {"bench": "restart", "results": results, "config": CONFIG,
              "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                          "platform": platform.platform()}}
    out = save_report("restart", report)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
