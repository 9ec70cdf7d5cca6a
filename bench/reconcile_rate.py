"""How many settlement lines per second `gateway reconcile settlement` reconciles.

Seeds a real store (SQLite, or PostgreSQL with `--database-url`) with N captured payments as the
worker writes them (the payment, its approved capture attempt, its capture and fee postings; every
tenth payment also refunded in part), writes the PSP's settlement file for them, and times one
reconciliation run end to end (parse, read our attempts and ledger, match, store the run) and each
phase on its own. `--tamper-per-mille K` changes the fee of K lines in 1000 to exercise the
discrepancy path.

    .venv/bin/python bench/reconcile_rate.py --lines 100000
    .venv/bin/python bench/reconcile_rate.py --lines 100000 --database-url postgresql://gateway:gateway@127.0.0.1:15432/gateway
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

from bench_common import save_report
from gateway.domain import ledger
from gateway.domain import settlement as st
from gateway.processing import reconcile as rc
from gateway.psp_sim import PSP_A
from gateway.store.ledger import insert_postings
from gateway.store.postgres import PostgresStore
from gateway.store.processing import ProcessingStore
from gateway.store.sqlite import SqliteStore

MERCHANT = "acct_bench"
PSP = "psp_a"
DAY = date(2026, 11, 20)
SEED_BATCH = 5_000


def seed(store: SqliteStore | PostgresStore, lines: int, tamper_per_mille: int) -> bytes:
    """Payments whose captures and refunds give `lines` settlement lines; returns the file."""
    store.create_merchant("Bench", uuid.uuid4().hex * 2, merchant_id=MERCHANT)
    pstore = ProcessingStore(store)
    start_ms = int(datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC).timestamp() * 1000) + 60_000
    out = ["reference,amount,currency,fee,net,status"]
    made = 0
    i = 0
    while made < lines:
        payments: list[tuple[object, ...]] = []
        attempts: list[tuple[object, ...]] = []
        postings: list[ledger.Posting] = []
        while made < lines and len(payments) < SEED_BATCH:
            pid = f"pay_{i:024d}"
            amount = 1_000 + (i * 37) % 90_000
            fee = PSP_A.fee_minor(amount)
            at = start_ms + i
            payments.append((pid, MERCHANT, "captured", amount, "USD", None, 0, i, "{}"))
            key = f"{pid}:capture:1"
            attempts.append((f"{key}#1", pid, "capture", key, amount, "USD", f"psp_a_{i:09d}", fee, at, at + 5))
            postings += [ledger.hold(f"{pid}:auth:1:authorization_hold", pid, MERCHANT, "USD", amount, at),
                         ledger.capture(f"{key}:capture", pid, MERCHANT, PSP, "USD", amount, at),
                         ledger.psp_fee(f"{key}:psp_fee", pid, PSP, "USD", fee, at)]
            settled_fee = fee + 1 if tamper_per_mille and i % 1000 < tamper_per_mille else fee
            out.append(f"{pid},{amount},USD,{settled_fee},{amount - settled_fee},captured")
            made += 1
            if i % 10 == 0 and made < lines:
                rkey = f"{pid}:refund:1"
                refund = amount // 2
                attempts.append((f"{rkey}#1", pid, "refund", rkey, refund, "USD", f"psp_a_{i:09d}", 0, at + 10,
                                 at + 15))
                postings.append(ledger.refund(f"{rkey}:refund", pid, MERCHANT, PSP, "USD", refund, at + 15))
                out.append(f"{pid},{-refund},USD,0,{-refund},refunded")
                made += 1
            i += 1
        with pstore._tx() as conn:
            conn.executemany("INSERT INTO payments (id, merchant_id, status, amount, currency, idempotency_key,"
                             " created, lsn, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", payments)
            conn.executemany(
                "INSERT INTO payment_attempts (attempt_id, payment_id, attempt_no, operation, psp, idempotency_key,"
                " amount, currency, status, final_capture, psp_reference, fee_minor, latency_ms, started_at_ms,"
                " finished_at_ms) VALUES (?, ?, 1, ?, 'psp_a', ?, ?, ?, 'approved', 0, ?, ?, 1.0, ?, ?)", attempts)
            insert_postings(conn, postings)  # the store's ledger path, as the worker writes them
    return ("\n".join(out) + "\n").encode()


def run(lines: int, tamper_per_mille: int, database_url: str | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        store: SqliteStore | PostgresStore
        if database_url:
            store = PostgresStore(database_url, f"bench_rc_{uuid.uuid4().hex[:8]}", pool_max=2, timeout_ms=600_000)
        else:
            store = SqliteStore(Path(folder) / "gateway.db")
        try:
            store.migrate()
            t0 = time.perf_counter()
            data = seed(store, lines, tamper_per_mille)
            seed_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            rows = st.parse_settlement(data)
            parse_s = time.perf_counter() - t0
            pstore = ProcessingStore(store)
            t0 = time.perf_counter()
            events = rc.load_events(pstore, PSP, DAY, (r.reference for r in rows))
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = st.match(rows, events.values())
            match_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            run = rc.reconcile(store, PSP, data, file_name=f"{PSP}-{DAY}.csv", day=DAY)
            total_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = rc.reconcile(store, PSP, data, file_name=f"{PSP}-{DAY}.csv", day=DAY)
            rerun_s = time.perf_counter() - t0
            assert again.existing and run.report["lines"] == lines == len(rows)
            expected_bad = result.discrepancy_count
            assert run.report["discrepancies"] == expected_bad
            assert tamper_per_mille or run.ok, run.report["counts"]
        finally:
            if isinstance(store, PostgresStore):
                store.drop_schema()
            store.close()
    return {
        "backend": "postgres" if database_url else "sqlite",
        "lines": lines,
        "file_bytes": len(data),
        "tamper_per_mille": tamper_per_mille,
        "matched": run.report["counts"]["matched"],
        "discrepancies": run.report["discrepancies"],
        "seed_s": round(seed_s, 2),
        "parse_s": round(parse_s, 3),
        "load_s": round(load_s, 3),
        "match_s": round(match_s, 3),
        "reconcile_s": round(total_s, 3),
        "lines_per_s": round(lines / total_s),
        "parse_lines_per_s": round(lines / parse_s),
        "rerun_same_file_ms": round(rerun_s * 1000, 1),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--tamper-per-mille", type=int, action="append", help="fee mismatches per 1000 lines (repeatable)")
    ap.add_argument("--database-url", help="PostgreSQL (cluster mode) instead of SQLite; a throw-away schema")
    args = ap.parse_args()
    if not 1 <= args.lines <= st.SETTLEMENT_LINES_MAX:
        ap.error(f"--lines must be 1..{st.SETTLEMENT_LINES_MAX}")
    results = [run(args.lines, t, args.database_url) for t in args.tamper_per_mille or [0, 10]]
    for r in results:
        print(f"{r['backend']}: {r['lines']} lines ({r['file_bytes']} bytes, {r['discrepancies']} discrepancies)"
              f" reconciled in {r['reconcile_s']} s = {r['lines_per_s']} lines/s"
              f" (parse {r['parse_s']} s, load {r['load_s']} s, match {r['match_s']} s;"
              f" same file again {r['rerun_same_file_ms']} ms)")
    out = save_report("reconcile_rate", results)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
