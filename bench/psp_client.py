"""What one PSP call over HTTP costs the worker: the gateway's `HTTPPSPClient` (aiohttp) against a
`gateway psp-sim` answering at once, beside plain httpx (the client it replaced) on the same server.

For each number of calls in flight: calls/s and the client process's CPU per call (user + system,
`getrusage`), the simulator pinned to one core and this process to the other. httpx's connection
pool re-scans every connection and queued request on each event, so its cost per call grows with
the calls in flight; the figure for the gateway's client is what a worker pays per PSP call.

    .venv/bin/python bench/psp_client.py --calls 4000 --inflight 32,256
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import msgspec
from bench_common import save_report
from gateway.domain.attempt import Outcome
from gateway.psp.client import HTTPPSPClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import free_port, wait_ready

BODY = msgspec.json.encode({"reference": "bench", "amount": 1000, "currency": "EUR", "token": "tok_visa"})


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _measure(calls: int, inflight: int, call: Callable[[int], Awaitable[bool]]) -> dict[str, float]:
    sem = asyncio.Semaphore(inflight)

    async def one(i: int) -> bool:
        async with sem:
            return await call(i)

    cpu, t = _cpu_s(), time.perf_counter()
    ok = await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed, cpu = time.perf_counter() - t, _cpu_s() - cpu
    assert all(ok), f"{ok.count(False)} of {calls} calls were not approved"
    return {"calls_per_s": round(calls / elapsed, 1), "cpu_us_per_call": round(cpu / calls * 1e6, 1)}


async def _gateway_client(base: str, calls: int, inflight: int) -> dict[str, float]:
    client = HTTPPSPClient(base, "psp_a", timeout_s=10)
    run = uuid.uuid4().hex[:8]

    async def call(i: int) -> bool:
        r = await client.authorize(reference=f"r{i}", amount=1000, currency="EUR", token="tok_visa",
                                   idempotency_key=f"gw-{run}-{i}")
        return r.outcome is Outcome.APPROVED

    try:
        return await _measure(calls, inflight, call)
    finally:
        await client.aclose()


async def _httpx(base: str, calls: int, inflight: int) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=10) as http:
        async def call(i: int) -> bool:
            r = await http.post(f"{base}/v1/psp_a/authorize", content=BODY,
                                headers={"idempotency-key": f"hx-{run}-{i}", "content-type": "application/json"})
            return r.status_code == 200 and b'"approved"' in r.content

        return await _measure(calls, inflight, call)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--inflight", default="32,256", help="calls in flight, comma-separated")
    ap.add_argument("--no-httpx", action="store_true", help="only the gateway's client")
    args = ap.parse_args()
    pin = (os.cpu_count() or 1) >= 2
    port = free_port()
    exe = shutil.which("gateway", path=str(Path(sys.executable).parent)) or "gateway"
    sim = subprocess.Popen([exe, "psp-sim", "--port", str(port), "--time-scale", "0"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    if pin:
        os.sched_setaffinity(sim.pid, {0})  # before its server starts threads: they inherit it
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(f"{base}/health", sim, "psp-sim", 30, poll_s=0.1)
        if pin:
            os.sched_setaffinity(0, {1})
        for inflight in (int(x) for x in args.inflight.split(",")):
            row: dict[str, object] = {"inflight": inflight, "aiohttp_gateway_client": asyncio.run(
                _gateway_client(base, args.calls, inflight))}
            if not args.no_httpx:
                row["httpx"] = asyncio.run(_httpx(base, args.calls, inflight))
            rows.append(row)
            print(f"inflight {inflight:4d}: " + "   ".join(
                f"{name}: {v['calls_per_s']:,.0f} calls/s, {v['cpu_us_per_call']:,.0f} us CPU/call"
                for name, v in row.items() if isinstance(v, dict)))
    finally:
        os.killpg(sim.pid, signal.SIGKILL)  # the simulator's server workers too (its own session)
        sim.wait()
    path = save_report("psp_client", {"calls": args.calls, "pinned": pin, "rows": rows,
                                      "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
