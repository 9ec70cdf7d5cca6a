"""WAL retention: old segments whose records are all materialised go, every payment stays readable,
and a SIGKILL while segments are being removed loses nothing (docs/idempotency.md, "WAL retention")."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from support import Gateway, auth

SMALL_SEGMENTS = "[wal]\nsegment_bytes_max = 4096\nretention_s = {retention}\n[idempotency]\nmaintenance_interval_ms = 50\n"
BODY = {"amount": 1000, "currency": "USD", "payment_method": "tok_visa"}


def _segments(g: Gateway) -> list[Path]:
    return sorted((g.data_dir / "wal").glob("*.wal"))


def _create(g: Gateway, n: int, prefix: str) -> dict[str, dict]:
    created = {}
    with httpx.Client(timeout=10) as c:
        for i in range(n):
            key = f"{prefix}-{i}"
            r = c.post(f"{g.url}/v1/payments", json={**BODY, "amount": 100 + i},
                       headers={**auth(), "Idempotency-Key": key})
            assert r.status_code == 201, r.text
            created[key] = r.json()
    return created


def _assert_all_readable_and_keys_hold(g: Gateway, created: dict[str, dict]) -> None:
    with httpx.Client(timeout=10) as c:
        for key, p in created.items():
            got = c.get(f"{g.url}/v1/payments/{p['id']}", headers=auth())
            assert got.status_code == 200 and got.json()["amount"] == p["amount"], key
        for key, p in list(created.items())[::25]:
            again = c.post(f"{g.url}/v1/payments", json={**BODY, "amount": p["amount"]},
                           headers={**auth(), "Idempotency-Key": key})
            assert again.status_code == 201 and again.json()["id"] == p["id"], again.text
            other = c.post(f"{g.url}/v1/payments", json={**BODY, "amount": 1},
                           headers={**auth(), "Idempotency-Key": key})
            assert other.status_code == 400, other.text


def _wait_for(condition, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_old_materialised_segments_are_removed_and_every_payment_stays_readable(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", SMALL_SEGMENTS.format(retention=1)).start()
    try:
        created = _create(g, 120, "ret")
        assert len(_segments(g)) >= 5
        _wait_for(lambda: len(_segments(g)) <= 2)
        _assert_all_readable_and_keys_hold(g, created)
        g.kill()
        g.start()
        _assert_all_readable_and_keys_hold(g, created)
        more = _create(g, 5, "after")
        _assert_all_readable_and_keys_hold(g, {**created, **more})
    finally:
        g.stop()


def test_sigkill_while_segments_are_removed_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    keep = Gateway(data, SMALL_SEGMENTS.format(retention=0)).start()
    try:
        created = _create(keep, 300, "kill")
        assert keep.terminate() == 0
    finally:
        keep.stop()
    before = len(sorted((data / "wal").glob("*.wal")))
    assert before >= 20
    time.sleep(1.1)  # every sealed segment is now older than the retention below
    g = Gateway(data, SMALL_SEGMENTS.format(retention=1))
    g.start()
    try:
        _wait_for(lambda: len(_segments(g)) < before)
        g.kill()  # as soon as removal has begun
        left = len(_segments(g))
        assert 1 <= left < before
        g.start()
        _assert_all_readable_and_keys_hold(g, created)
        _wait_for(lambda: len(_segments(g)) <= 2)
        _assert_all_readable_and_keys_hold(g, created)
    finally:
        g.stop()
