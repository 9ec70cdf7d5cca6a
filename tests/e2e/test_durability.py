"""A 2xx means the payment is on disk: proven by SIGKILL, restart and reading everything back."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path

import httpx
from support import Gateway, auth, same_payment

BODY = {"amount": 2500, "currency": "EUR", "payment_method": "tok_visa", "metadata": {"order_id": "x"}}


def _rows_by_id(g: Gateway) -> dict[str, int]:
    with sqlite3.connect(g.data_dir / "gateway.db") as db:
        return dict(db.execute("SELECT id, count(*) FROM payments GROUP BY id").fetchall())


def test_second_request_while_first_is_in_flight_gets_409(tmp_path: Path) -> None:
    # A long group-commit window keeps the first request in flight long enough to race it.
    g = Gateway(tmp_path / "data", "[wal]\nfsync_interval_us = 400000\nbatch_records_max = 100000\n").start()
    try:
        key = str(uuid.uuid4())

        async def race() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as c:
                h = {**auth(), "Idempotency-Key": key}
                first = asyncio.create_task(c.post(f"{g.url}/v1/payments", json=BODY, headers=h))
                await asyncio.sleep(0.1)
                second = await c.post(f"{g.url}/v1/payments", json=BODY, headers=h)
                return await first, second

        first, second = asyncio.run(race())
        assert first.status_code == 201
        assert second.status_code == 409 and second.json()["error"]["code"] == "idempotency_key_in_use"
        third = httpx.post(f"{g.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": key}, timeout=10)
        assert third.status_code == 201 and third.json()["id"] == first.json()["id"]
    finally:
        g.stop()


def test_sigterm_drains_and_restart_keeps_payments_and_keys(fresh_gateway: Gateway) -> None:
    g = fresh_gateway.start()
    created = {}
    for i in range(20):
        key = f"order-{i}"
        r = httpx.post(f"{g.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": key}, timeout=10)
        assert r.status_code == 201
        created[key] = r.json()
    assert g.terminate() == 0
    g.start()
    for key, p in created.items():
        got = httpx.get(f"{g.url}/v1/payments/{p['id']}", headers=auth(), timeout=10)
        assert got.status_code == 200 and same_payment(got.json(), p)
        again = httpx.post(f"{g.url}/v1/payments", json=BODY, headers={**auth(), "Idempotency-Key": key}, timeout=10)
        assert again.status_code == 201 and again.json() == p
        assert again.headers["idempotent-replayed"] == "true"


def test_sigkill_during_a_burst_loses_no_acknowledged_payment(fresh_gateway: Gateway) -> None:
    g = fresh_gateway.start()
    acked: dict[str, dict] = {}
    acked_keys: dict[str, str] = {}
    total = 600

    async def client(c: httpx.AsyncClient, queue: asyncio.Queue[int]) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            headers = auth()
            key = f"burst-{i}" if i % 2 == 0 else None
            if key:
                headers["Idempotency-Key"] = key
            try:
                r = await c.post(f"{g.url}/v1/payments", json={**BODY, "amount": 100 + i}, headers=headers)
            except httpx.HTTPError:
                continue
            if r.status_code == 201:
                p = r.json()
                acked[p["id"]] = p
                if key:
                    acked_keys[key] = p["id"]

    async def killer() -> None:
        while len(acked) < 200:
            await asyncio.sleep(0.002)
        await asyncio.to_thread(g.kill)

    async def burst() -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64)) as c:
            await asyncio.gather(killer(), *[client(c, queue) for _ in range(64)])

    asyncio.run(burst())
    assert 200 <= len(acked) < total, "the kill must land mid-burst"

    g.start()
    for pid, p in acked.items():
        r = httpx.get(f"{g.url}/v1/payments/{pid}", headers=auth(), timeout=10)
        assert r.status_code == 200, pid
        assert same_payment(r.json(), p)
    # Every acknowledged payment is stored exactly once, none twice.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = _rows_by_id(g)
        if all(pid in rows for pid in acked):
            break
        time.sleep(0.05)
    assert all(rows.get(pid) == 1 for pid in acked)
    with sqlite3.connect(g.data_dir / "gateway.db") as db:
        per_key = db.execute(
            "SELECT idempotency_key, count(*) FROM payments WHERE idempotency_key IS NOT NULL GROUP BY 1 HAVING count(*) > 1"
        ).fetchall()
    assert per_key == []
    # Retrying an acknowledged key after the crash replays the same payment.
    for key, pid in list(acked_keys.items())[:20]:
        i = int(key.split("-")[1])
        r = httpx.post(f"{g.url}/v1/payments", json={**BODY, "amount": 100 + i},
                       headers={**auth(), "Idempotency-Key": key}, timeout=10)
        assert r.status_code == 201 and r.json()["id"] == pid


def test_torn_wal_tail_is_cut_on_restart(fresh_gateway: Gateway) -> None:
    g = fresh_gateway.start()
    ids = [httpx.post(f"{g.url}/v1/payments", json=BODY, headers=auth(), timeout=10).json()["id"] for _ in range(5)]
    g.kill()
    segment = max((g.data_dir / "wal").glob("*.wal"))
    with segment.open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02")  # a record header cut short by the crash
    g.start()
    assert "6 torn bytes cut" in g.log()
    for pid in ids:
        assert httpx.get(f"{g.url}/v1/payments/{pid}", headers=auth(), timeout=10).status_code == 200
    assert httpx.post(f"{g.url}/v1/payments", json=BODY, headers=auth(), timeout=10).status_code == 201
