"""An Idempotency-Key holds for `ttl_s` whatever the in-memory table's bound: after eviction and after
a restart the durable record answers (same body: the stored answer; another body: 400), and nothing is
created twice (docs/idempotency.md, "Beyond the memory table")."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import httpx
from support import Gateway, auth

SMALL_TABLE = "[idempotency]\nentries_max = 1000\n"
BODY = {"amount": 1000, "currency": "USD", "payment_method": "tok_visa"}


def _post(g: Gateway, key: str, body: dict, client: httpx.Client) -> httpx.Response:
    return client.post(f"{g.url}/v1/payments", json=body, headers={**auth(), "Idempotency-Key": key})


def _evict(g: Gateway, client: httpx.Client, n: int = 1500) -> None:
    for i in range(n):
        r = _post(g, f"filler-{i}", {**BODY, "amount": 100 + i}, client)
        assert r.status_code == 201, r.text


def _payment_rows(g: Gateway, payment_id: str) -> list[tuple[int]]:
    with sqlite3.connect(g.data_dir / "gateway.db") as db:
        return db.execute("SELECT amount FROM payments WHERE id = ?", (payment_id,)).fetchall()


def _metric(g: Gateway, client: httpx.Client, name: str) -> int:
    m = re.search(rf"^{name} (\d+)$", client.get(f"{g.url}/metrics").text, re.MULTILINE)
    assert m is not None, name
    return int(m.group(1))


def _assert_key_holds(g: Gateway, client: httpx.Client, first: dict) -> None:
    other = _post(g, "k0", {**BODY, "amount": 5555}, client)
    assert other.status_code == 400, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    again = _post(g, "k0", BODY, client)
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first["id"] and again.json()["amount"] == 1000
    got = client.get(f"{g.url}/v1/payments/{first['id']}", headers=auth())
    assert got.status_code == 200 and got.json()["amount"] == 1000


def test_evicted_key_is_answered_from_the_durable_record_and_across_a_restart(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", SMALL_TABLE).start()
    try:
        with httpx.Client(timeout=10) as c:
            first = _post(g, "k0", BODY, c)
            assert first.status_code == 201
            mismatch = _post(g, "k0", {**BODY, "amount": 2222}, c)
            assert mismatch.status_code == 400
            _evict(g, c)
            _assert_key_holds(g, c, first.json())
            assert _metric(g, c, "gateway_idempotency_durable_checks_total") >= 1
        g.kill()  # SIGKILL: the next start recovers from the checkpoint, not from a clean shutdown
        g.start()
        with httpx.Client(timeout=10) as c:
            _assert_key_holds(g, c, first.json())
            _evict(g, c)  # evicted again, after the restart
            _assert_key_holds(g, c, first.json())
        assert g.terminate() == 0
        assert _payment_rows(g, first.json()["id"]) == [(1000,)]
    finally:
        g.stop()


def test_fifty_concurrent_retries_after_eviction_create_nothing_new(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", SMALL_TABLE).start()
    try:
        with httpx.Client(timeout=10) as c:
            first = _post(g, "k0", BODY, c).json()
            _evict(g, c)
            before = _metric(g, c, "gateway_wal_committed_lsn")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as ac:
                h = {**auth(), "Idempotency-Key": "k0"}
                return await asyncio.gather(*(ac.post(f"{g.url}/v1/payments", json=BODY, headers=h)
                                              for _ in range(50)))

        answers = asyncio.run(burst())
        assert all(r.status_code == 201 for r in answers), [r.status_code for r in answers]
        assert {r.json()["id"] for r in answers} == {first["id"]}
        assert all(r.json()["amount"] == 1000 for r in answers)
        with httpx.Client(timeout=10) as c:
            assert _metric(g, c, "gateway_wal_committed_lsn") == before, "a retry wrote a record"
            assert _metric(g, c, "gateway_idempotency_durable_checks_total") >= 1, "answered from the store"
            assert _metric(g, c, "gateway_idempotency_entries") <= 1000 + 64
    finally:
        g.stop()
