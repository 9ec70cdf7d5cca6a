"""Plain creates with oha: a compiled open-loop generator that can offer what k6 cannot on one core.

k6 (bench/k6_open_loop.js) carries the scenario traffic (distinct idempotency keys, replays, several
merchants) but saturates its core near 3-4K req/s here, below the gateway's knee. oha offers a fixed
rate (`-q`, `--latency-correction`: latency from each request's intended start) of plain creates: one
merchant's key, no Idempotency-Key (oha's headers are static), and a different body per request
(`-Z FILE`: one JSON body per line, taken from the same targets as k6). A step where oha sent less
than 95% of the offered rate while its own core was 90%+ busy is marked `generator_saturated`: the
generator, not the server, was the limit.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

GENERATOR_SATURATED_SHARE = 0.9
TIMEOUT_S = 2


def write_bodies(targets: Path, out: Path, merchant: int = 0) -> Path:
    """One body per line for `-Z`: the targets' bodies of one merchant (they carry no key)."""
    rows = json.loads(targets.read_text())
    bodies = [body for m, _key, body in rows if m == merchant] or [rows[0][2]]
    out.write_text("\n".join(json.dumps(json.loads(b), separators=(",", ":")) for b in bodies) + "\n")
    return out


def run_step(oha: Path, bodies: Path, api_key: str, port: int, rate: float, seconds: float,
             generator_cpus: str | None, connections: int, cores_busy: Any) -> dict[str, Any]:
    """One offered rate; `cores_busy()` returns busy seconds per core (http_bench.cores_busy_s)."""
    # `-w`: requests still in flight when the step ends are waited for and counted by their answer;
    # without it oha aborts them ("aborted due to deadline"), which at rate x latency in flight alone
    # passes the 0.1% error bound of the knee at a few ms of latency.
    argv = [str(oha), "-q", str(rate), "-z", f"{seconds}s", "-w", "--latency-correction", "--no-tui",
            "--output-format", "json", "-c", str(connections), "-m", "POST", "-Z", str(bodies),
            "-T", "application/json", "-H", f"Authorization: Bearer {api_key}", "-t", f"{TIMEOUT_S}s",
            f"http://127.0.0.1:{port}/v1/payments"]
    if generator_cpus:
        argv = ["taskset", "-c", generator_cpus, *argv]
    busy0, t0 = cores_busy(), time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    busy1, wall = cores_busy(), time.monotonic() - t0
    if proc.returncode != 0:
        return {"offered_rate": rate, "error": proc.stderr.strip()[-300:]}
    data = json.loads(proc.stdout)
    pct = data.get("latencyPercentiles", {})
    summary = data["summary"]
    statuses = {str(k): int(v) for k, v in data.get("statusCodeDistribution", {}).items()}
    total = sum(statuses.values()) + sum(int(v) for v in data.get("errorDistribution", {}).values())
    ok = sum(v for k, v in statuses.items() if k in ("200", "201", "402"))
    gen_cores = [int(c) for c in generator_cpus.split(",")] if generator_cpus and generator_cpus.isdigit() else []
    gen_busy = (sum(busy1.get(c, 0) - busy0.get(c, 0) for c in gen_cores) / (wall * len(gen_cores))
                if gen_cores and wall > 0 else None)
    sent_rate = total / seconds if seconds else 0.0

    def ms(key: str) -> float | None:
        v = pct.get(key)
        return round(v * 1000, 3) if v is not None else None

    return {
        "offered_rate": rate, "sent_rate": round(sent_rate, 1),
        "achieved_rate": round(ok / seconds, 1) if seconds else 0.0,
        "error_rate": round(1 - ok / total, 5) if total else 1.0,
        "p50_ms": ms("p50"), "p99_ms": ms("p99"), "p999_ms": ms("p99.9"),
        "status_counts": statuses, "error_kinds": data.get("errorDistribution", {}), "generator_core_busy_share": round(gen_busy, 3) if gen_busy is not None else None,
        "generator_saturated": bool(sent_rate < 0.95 * rate and gen_busy is not None
                                    and gen_busy >= GENERATOR_SATURATED_SHARE),
        "requests_per_s_reported": round(summary.get("requestsPerSec", 0.0), 1),
    }


def knee(steps: list[dict[str, Any]], p50_ms_max: float = 5.0, error_rate_max: float = 0.001) -> float | None:
    """Issue 12's knee: highest offered rate served at >= 95% with < 0.1% errors and P50 < 5 ms."""
    passing = [s["offered_rate"] for s in steps if "error" not in s and s["achieved_rate"] >= 0.95 * s["offered_rate"]
               and s["error_rate"] < error_rate_max and (s["p50_ms"] or 1e9) < p50_ms_max]
    return max(passing) if passing else None
