"""Embedded mode's worker child process: it materialises the WAL and drives the payments, the HTTP process
only accepts. A real gateway, a real child, real signals."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from support import Gateway, auth, run_cli

FAST_ENV = {"GATEWAY_PSP_TIME_SCALE": "0", "GATEWAY_PSPS": "psp_a,psp_b", "GATEWAY_RECONCILE_INTERVAL_MS": "100"}


def _child_pid(data_dir: Path) -> int:
    """The pid of the worker child of the gateway serving `data_dir` (from /proc: no ps needed)."""
    needle = str(data_dir / "gateway.db").encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gateway.runtime.worker_process" in cmdline and needle in cmdline:
            return int(entry)
    raise AssertionError("no worker child process found")


def _create(g: Gateway, n: int, key_prefix: str) -> list[str]:
    ids = []
    with httpx.Client(base_url=g.url, headers=auth(), timeout=10) as c:
        for i in range(n):
            r = c.post("/v1/payments", headers={"Idempotency-Key": f"{key_prefix}-{i}"},
                       json={"amount": 1000 + i, "currency": "USD", "payment_method": "tok_visa", "capture": True})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
    return ids


def _settled(g: Gateway, ids: list[str], timeout_s: float, done: Callable[[dict], bool] | None = None) -> dict[str, dict]:
    """The payments once each is `done` (by default: none is `processing` or `pending_verification` or has
    an operation open)."""
    done = done or _is_settled
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=g.url, headers=auth(), timeout=10) as c:
        while True:
            got = {pid: c.get(f"/v1/payments/{pid}").json() for pid in ids}
            if all(done(p) for p in got.values()) or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


def _is_settled(p: dict) -> bool:
    return p["status"] not in ("processing", "pending_verification") and p.get("pending_operation") is None


def test_the_http_process_runs_no_tailer_and_payments_still_read_their_writes(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", extra_env=FAST_ENV).start()
    try:
        with httpx.Client(base_url=g.url, headers=auth(), timeout=10) as c:
            for i in range(50):
                r = c.post("/v1/payments", json={"amount": 500 + i, "currency": "EUR", "payment_method": "tok_visa"})
                assert r.status_code == 201
                # Read at once: from the acknowledgement's copy until the child has stored it.
                got = c.get(f"/v1/payments/{r.json()['id']}")
                assert got.status_code == 200 and got.json()["amount"] == 500 + i
        metrics = httpx.get(f"{g.url}/metrics", timeout=10).text
        assert "gateway_backlog_payments" in metrics
        threads = {Path(f"/proc/{g.proc.pid}/task/{t}/comm").read_text().strip()  # type: ignore[union-attr]
                   for t in os.listdir(f"/proc/{g.proc.pid}/task")}  # type: ignore[union-attr]
        assert "wal-tailer" not in threads
    finally:
        g.stop()


def test_a_killed_worker_child_is_started_again_and_every_payment_settles(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", extra_env=FAST_ENV).start()
    try:
        before = _create(g, 30, "before")
        first = _child_pid(g.data_dir)
        os.kill(first, signal.SIGKILL)
        after = _create(g, 30, "after")  # accepted while no child runs: durable in the WAL
        # The child's in-process PSPs die with it (a real PSP keeps its transactions), so a payment whose
        # PSP call the kill cut short may end declined or uncaptured; what must hold is that every one
        # reaches a final state and the ledger balances.
        payments = _settled(g, before + after, timeout_s=30)
        assert all(_is_settled(p) for p in payments.values()), {k: p["status"] for k, p in payments.items()}
        # Those accepted while no child ran were untouched by the kill: all captured. (An auto-capture
        # follows its authorisation, so one may still be `authorized` a moment after the rest settled.)
        captured = _settled(g, after, timeout_s=30, done=lambda p: p["status"] == "captured")
        assert all(p["status"] == "captured" for p in captured.values()), \
            {pid: p for pid, p in captured.items() if p["status"] != "captured"}
        assert _child_pid(g.data_dir) != first
        metrics = httpx.get(f"{g.url}/metrics", timeout=10).text
        assert "gateway_worker_respawns_total 1" in metrics
    finally:
        g.stop()
    check = run_cli("ledger", "check", "--data-dir", str(g.data_dir), check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_at_the_backlog_bound_a_create_is_refused_with_503_and_retry_after(tmp_path: Path) -> None:
    # PSPs that take minutes and one payment at a time in the worker: the backlog only grows.
    cfg = "[worker]\nbacklog_max = 100\ninflight_max = 1\n[psp]\ntime_scale = 500.0\npsps = ['psp_a']\n"
    g = Gateway(tmp_path / "data", config_text=cfg).start()
    try:
        answers = []
        with httpx.Client(base_url=g.url, headers=auth(), timeout=10) as c:
            for i in range(400):
                r = c.post("/v1/payments", headers={"Idempotency-Key": f"k{i}"},
                           json={"amount": 100 + i, "currency": "USD", "payment_method": "tok_visa"})
                answers.append(r)
                if r.status_code == 503:
                    break
                if i % 50 == 49:
                    time.sleep(0.5)  # the child reports its backlog every 0.2 s
            refused = answers[-1]
            assert refused.status_code == 503, [a.status_code for a in answers][-5:]
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "backlog_full"
            assert sum(a.status_code == 201 for a in answers) >= 100
            # Nothing was written for the refused request: its key is free, and a retry is refused again
            # (not replayed), since the backlog has not drained.
            again = c.post("/v1/payments", headers={"Idempotency-Key": f"k{len(answers) - 1}"},
                           json={"amount": 100 + len(answers) - 1, "currency": "USD", "payment_method": "tok_visa"})
            assert again.status_code == 503 and "idempotent-replayed" not in again.headers
        metrics = httpx.get(f"{g.url}/metrics", timeout=10).text
        assert "gateway_backlog_refused_total 0" not in metrics
    finally:
        g.stop()
