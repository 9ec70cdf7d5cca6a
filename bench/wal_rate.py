"""WAL throughput with fsync on, through the Python call: N writer threads each create payments with
`FastPath.create_payment` and wait for their commit (`wait_committed`, GIL released), so group commits
form the way they do under concurrent HTTP load. Prints records/s and records per fdatasync per writer
count and saves JSON under bench/results/.

    python bench/wal_rate.py [--writers 8,64,256] [--records 1500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading

from bench_common import run_threads_s, save_report
from gateway._fastpath import FastPath

BODY = b'{"amount": 1000, "currency": "USD", "payment_method": "tok_visa"}'


def run(writers: int, records: int, fsync_interval_us: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        cfg = {"wal_dir": f"{d}/wal", "fsync_interval_us": fsync_interval_us, "batch_records_max": 512,
               "rate_limit_per_s": 1e9, "rate_limit_burst": 1e9}
        fp = FastPath(json.dumps(cfg))

        def writer() -> None:
            for _ in range(records):
                lsn = fp.create_payment("acct_bench", None, BODY).lsn
                assert fp.wait_committed(lsn, 10_000), "commit did not arrive"

        elapsed = run_threads_s([threading.Thread(target=writer) for _ in range(writers)])
        fsyncs = next(int(float(line.split()[-1])) for line in fp.metrics_text().splitlines()
                      if line.startswith("gateway_wal_fsync_seconds_count"))
        fp.close()
    total = writers * records
    return {"writers": writers, "records": total, "seconds": elapsed, "records_per_s": total / elapsed,
            "fsyncs": fsyncs, "records_per_fsync": total / max(fsyncs, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--writers", default="8,64,256")
    p.add_argument("--records", type=int, default=1500, help="records per writer")
    p.add_argument("--fsync-interval-us", type=int, default=200)
    args = p.parse_args()
    rows = [run(int(w), args.records, args.fsync_interval_us) for w in args.writers.split(",")]
    print("| writers | records/s | records per fdatasync |\n|---|---|---|")
    for r in rows:
        print(f"| {r['writers']} | {r['records_per_s']:.0f} | {r['records_per_fsync']:.1f} |")
    out = save_report("wal_rate", {"fsync_interval_us": args.fsync_interval_us, "rows": rows})
    print(f"wal_rate: report in {out}")


if __name__ == "__main__":
    main()
