"""How long a merchant change takes to reach a running embedded gateway: the time from the return of
`gateway merchant revoke-key` (or `rotate-key`, `update`) to the first request that sees it. The
contract is within 2 s; the mechanism is the `[merchants] refresh_ms` poll (1 s by default).

    .venv/bin/python bench/merchant_propagation.py [--trials 5] [--out bench/results/merchant-propagation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import write_report

GATEWAY = str(Path(sys.executable).parent / "gateway")
PAYMENT = {"amount": 100, "currency": "USD", "payment_method": "tok_visa"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(data: Path, *args: str) -> dict:
    out = subprocess.run([GATEWAY, "merchant", *args, "--data-dir", str(data)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return json.loads(out)


def _seen(c: httpx.Client, key: str, status: int, timeout_s: float = 30) -> float:
    """Seconds until a create with `key` answers `status` (polled every 10 ms)."""
    started = time.perf_counter()
    while c.post("/v1/payments", headers={"Authorization": f"Bearer {key}"}, json=PAYMENT).status_code != status:
        if time.perf_counter() - started > timeout_s:
            raise AssertionError(f"status {status} never seen")
        time.sleep(0.01)
    return time.perf_counter() - started


def run(trials: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        port = _port()
        env = {**os.environ, "GATEWAY_PSP_TIME_SCALE": "0"}
        proc = subprocess.Popen([GATEWAY, "serve", "--data-dir", str(data), "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if c.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, "gateway not ready"
                    time.sleep(0.05)
                revoke, rotate, update = [], [], []
                for i in range(trials):
                    m = _cli(data, "create", "--name", f"Bench {i}")
                    _seen(c, m["api_key"], 201)
                    new = _cli(data, "rotate-key", m["id"], "--overlap-s", "0")["api_key"]
                    rotate.append(_seen(c, m["api_key"], 401))
                    _cli(data, "update", m["id"], "--rate-limit-per-s", "0.01", "--rate-limit-burst", "1")
                    update.append(_seen(c, new, 429))
                    other = _cli(data, "create", "--name", f"Bench {i} b")
                    _seen(c, other["api_key"], 201)
                    _cli(data, "revoke-key", other["id"], "--key", other["api_key"])
                    revoke.append(_seen(c, other["api_key"], 401))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    def summary(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"p50_s": round(xs[len(xs) // 2], 3), "max_s": round(xs[-1], 3)}
    return {"trials": trials, "rotate_old_key_refused": summary(rotate), "rate_limit_applied": summary(update),
            "revoked_key_refused": summary(revoke), "refresh_ms": 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", default="bench/results/merchant-propagation.json")
    args = ap.parse_args()
    report = run(args.trials)
    out = write_report(Path(args.out), report)
    print(json.dumps(report), f"-> {out}")


if __name__ == "__main__":
    main()
