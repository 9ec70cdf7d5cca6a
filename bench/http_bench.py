"""Open-loop HTTP benchmark: the gateway beside a bare server (floor), the same bare server whose every
201 waits for a group-committed fsync (durable_floor, bench/durable_floor_app.py) and a plain-Python
baseline. Every step also records the disk's fsync latency of the same seconds (`fsync` in a step: a
probe thread fdatasyncing 4 KiB every 20 ms, and for the gateway its own WAL fsync histogram).

Every system gets the same traffic at the same stepped offered rates, on the same machine, in the same
run. The load generator is k6 (constant-arrival-rate executor, open loop) driven by bench/k6_open_loop.js;
latency is measured from each request's intended send time (coordinated omission corrected) and k6's
dropped iterations count as errors. The server and k6 are pinned to separate cores when the machine has
more than one. Results land in bench/results/<timestamp>/ as report.json, report.md and PNG plots.

    python bench/http_bench.py            # full run, a few minutes
    python bench/http_bench.py --quick    # seconds, tiny rates: a smoke test of the harness
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import oha_creates
from fsync_stats import FsyncProbe, gateway_fsync_histogram, histogram_delta

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_BIN = Path(sys.executable).parent
TOOLS_BIN = REPO / ".cache" / "tools" / "bin"

# The 10K-100K series with low steps first so a 2-core machine finds the knee; a system's higher steps are skipped once it (or the
# generator) is clearly saturated, which keeps a run to a few minutes.
DEFAULT_RATES = [250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 75_000, 100_000]
QUICK_RATES = [200, 500]
KNEE_P99_MS = 10.0
KNEE_ERROR_RATE = 0.001
# The second knee definition (issue 12): highest offered rate served at >= 95% with < 0.1% errors and P50 under this.
KNEE_P50_MS = 5.0
# Statuses that are correct answers to the planned traffic: created, replayed, risk decline, and the
# 409 a retry gets while its original is still in flight. Anything else (429 included) is an error.
OK_STATUSES = "200,201,202,402,409"
SYSTEMS = ("floor", "durable_floor", "gateway", "gateway_base", "baseline")
# The embedded gateway's child process (runtime/worker_process.py) materialises committed WAL records into
# SQLite: the async path, not the request path, but a child of the server, so on the server's core(s).
# `--tailer-on-generator-cores` moves it to the generator's: the request path then has its core alone,
# and the generator shares its own (on 2 cores the generator's core is then the first to fill).
TAILER_CMD = "gateway.runtime.worker_process"
# The disk probe of every step: one 4 KiB fdatasync this often, beside the system's own fsyncs.
FSYNC_PROBE_INTERVAL_S = 0.02


@dataclass
class Traffic:
    """The request mix, identical for every system; it is recorded in report.json."""

    merchants: int = 6
    cards: int = 200_000
    card_zipf_exponent: float = 0.9
    blocklisted_card_share: float = 0.01
    blocklisted_email_share: float = 0.005
    hot_device_share: float = 0.01
    hot_devices: int = 10
    replay_share: float = 0.03
    replay_min_distance: int = 500
    no_idempotency_key_share: float = 0.10
    # Entries in the targets file; k6 wraps around with fresh idempotency keys (see k6_open_loop.js).
    targets_max: int = 60_000
    seed: int = 20260101
    blocklisted_cards: list[str] = field(default_factory=lambda: [f"tok_blocked_{i:03d}" for i in range(100)])
    blocklisted_emails: list[str] = field(
        default_factory=lambda: [f"fraud{i}@example.net" for i in range(20)]
    )


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str]
    cwd: Path
    ready_path: str = "/readyz"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_text(argv: list[str], timeout: float = 10) -> str:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    load = os.getloadavg()
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in load],
        "hostname_hash": abs(hash(platform.node())) % 10**8,
    }


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    from importlib import metadata

    for pkg in ("granian", "msgspec", "uvloop", "fastapi", "uvicorn", "pydantic", "httptools", "gateway"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    out["k6"] = run_text([str(TOOLS_BIN / "k6"), "version"]) or "unknown"
    out["git_commit"] = run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return out


def ensure_tools() -> Path:
    """k6 from the Go module proxy into .cache/tools/bin (bench/tools.sh), once; oha is left to `--oha`."""
    k6 = TOOLS_BIN / "k6"
    if not k6.exists():
        env = {**os.environ, "BENCH_SKIP_OHA": "1"}
        subprocess.run(["bash", str(BENCH / "tools.sh")], check=True, env=env, stdout=subprocess.DEVNULL)
    return k6


def cpu_plan(cores: int, no_pin: bool) -> dict[str, Any]:
    """Server on core 0, k6 on the rest (half each from 4 cores); nothing is pinned on a single core."""
    if no_pin or cores < 2 or shutil.which("taskset") is None:
        return {"pinned": False, "server_cpus": None, "generator_cpus": None}
    server = "0" if cores < 4 else f"0-{cores // 2 - 1}"
    generator = "1" if cores < 4 else f"{cores // 2}-{cores - 1}"
    if cores > 2 and cores < 4:
        generator = f"1-{cores - 1}"
    return {"pinned": True, "server_cpus": server, "generator_cpus": generator}


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


# --------------------------------------------------------------------------------------------- traffic


def build_targets(path: Path, traffic: Traffic, api_keys: list[str], count: int) -> dict[str, Any]:
    """Write `count` targets for k6_open_loop.js; returns the realised mix for the report.

    The file is one JSON array of [merchant index, idempotency key id or -1, JSON body]; k6 adds the
    merchant's API key and turns the key id into a key unique to the step and the wrap-around.
    """
    import msgspec

    rng = np.random.default_rng(traffic.seed)
    ranks = np.arange(1, traffic.cards + 1, dtype=np.float64)
    card_p = ranks**-traffic.card_zipf_exponent
    card_p /= card_p.sum()
    cards = rng.choice(traffic.cards, size=count, p=card_p)
    merchant_p = 1.0 / np.arange(1, len(api_keys) + 1)
    merchant_p /= merchant_p.sum()
    merchants = rng.choice(len(api_keys), size=count, p=merchant_p)
    amounts = np.clip(rng.lognormal(mean=np.log(2500), sigma=1.0, size=count), 50, 2_000_000).astype(int)
    currencies = rng.choice(["USD", "EUR", "GBP", "JPY"], size=count, p=[0.7, 0.15, 0.1, 0.05])
    countries = rng.choice(
        ["US", "GB", "DE", "FR", "JP", "BR"], size=count, p=[0.6, 0.1, 0.1, 0.08, 0.07, 0.05]
    )
    kind = rng.random(count)
    no_key = rng.random(count) < traffic.no_idempotency_key_share
    replay = rng.random(count) < traffic.replay_share
    replay[: traffic.replay_min_distance] = False
    encoder = msgspec.json.Encoder()
    lines: list[list[Any]] = []
    realised = {"blocklisted_card": 0, "blocklisted_email": 0, "hot_device": 0, "replay": 0, "no_key": 0}
    b1 = traffic.blocklisted_card_share
    b2 = b1 + traffic.blocklisted_email_share
    b3 = b2 + traffic.hot_device_share
    for i in range(count):
        if replay[i]:
            src = int(rng.integers(0, i - traffic.replay_min_distance + 1))
            lines.append(lines[src])
            realised["replay"] += 1
            continue
        card = f"tok_card_{int(cards[i]):06d}"
        email = f"buyer{int(cards[i])}@example.com"
        device = f"dev_{int(cards[i]):06d}"
        if kind[i] < b1:
            card = traffic.blocklisted_cards[int(cards[i]) % len(traffic.blocklisted_cards)]
            realised["blocklisted_card"] += 1
        elif kind[i] < b2:
            email = traffic.blocklisted_emails[int(cards[i]) % len(traffic.blocklisted_emails)]
            realised["blocklisted_email"] += 1
        elif kind[i] < b3:
            device = f"dev_hot_{int(cards[i]) % traffic.hot_devices}"
            realised["hot_device"] += 1
        currency = str(currencies[i])
        amount = int(amounts[i]) // 100 if currency == "JPY" else int(amounts[i])
        body = {
            "amount": max(amount, 1),
            "currency": currency,
            "payment_method": card,
            "capture": bool(i % 5),
            "description": "bench order",
            "metadata": {"order_id": f"ord_{i}"},
            "customer": {
                "email": email,
                "ip": f"10.{(int(cards[i]) >> 16) & 255}.{(int(cards[i]) >> 8) & 255}.{int(cards[i]) & 255}",
                "device_id": device,
                "country": str(countries[i]),
            },
        }
        if no_key[i]:
            realised["no_key"] += 1
        lines.append([int(merchants[i]), -1 if no_key[i] else i, encoder.encode(body).decode()])
    path.write_bytes(encoder.encode(lines))
    return {k: round(v / count, 4) for k, v in realised.items()} | {"targets": count}


# --------------------------------------------------------------------------------------------- servers


def gateway_cli() -> Path | None:
    exe = VENV_BIN / "gateway"
    if not exe.exists():
        return None
    probe = subprocess.run([str(exe), "--help"], capture_output=True, timeout=30, check=False)
    return exe if probe.returncode == 0 else None


def create_gateway_merchants(exe: Path, data_dir: Path, n: int, config: Path) -> list[str]:
    """Merchants with rate limits far above the offered rates: the stage runs, 429s never happen."""
    keys: list[str] = []
    for i in range(n):
        out = subprocess.run(
            [
                str(exe),
                "merchant",
                "create",
                "--name",
                f"bench-merchant-{i}",
                "--data-dir",
                str(data_dir),
                "--config",
                str(config),
                "--rate-limit-per-s",
                "10000000",
                "--rate-limit-burst",
                "10000000",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        keys.append(json.loads(out.strip().splitlines()[-1])["api_key"])
    return keys


BENCH_ADMIN_KEY = "ak_bench_only_for_this_run"
DEVICE_VELOCITY_MAX = 100
# The same risk policy the baseline applies (baseline_app.py): blocklisted cards and e-mails, and more
# than `device_velocity_max` payments from one device in a minute.
GATEWAY_RULES = """\
blocklisted_card: block if :card: in @bench_blocked_cards
blocklisted_email: block if :email: in @bench_blocked_emails
hot_device: block if :device_count_1m: > {device_velocity_max}
"""


def load_gateway_risk(port: int, traffic: Traffic, device_velocity_max: int) -> dict[str, Any]:
    """Push the bench's lists and rules through the admin API; returns what was loaded or the error."""
    import httpx

    base = f"http://127.0.0.1:{port}/v1/admin"
    auth = {"Authorization": f"Bearer {BENCH_ADMIN_KEY}"}
    try:
        with httpx.Client(headers=auth, timeout=10) as c:
            for name, kind, values in (
                ("bench_blocked_cards", "card", traffic.blocklisted_cards),
                ("bench_blocked_emails", "email", traffic.blocklisted_emails),
            ):
                c.post(f"{base}/lists", json={"name": name, "kind": kind}).raise_for_status()
                c.post(f"{base}/lists/{name}/load", json={"values": values}).raise_for_status()
            source = GATEWAY_RULES.format(device_velocity_max=device_velocity_max)
            r = c.post(f"{base}/rules", json={"source": source, "comment": "bench policy"})
            r.raise_for_status()
            return {"loaded": True, "rules": source.splitlines(), "version": r.json().get("version")}
    except httpx.HTTPError as exc:
        detail = exc.response.text[:300] if isinstance(exc, httpx.HTTPStatusError) else str(exc)
        return {"loaded": False, "error": f"{exc.__class__.__name__}: {detail}"}


def start_server(server: Server, cpus: str | None, out_dir: Path, timeout_s: float = 60) -> None:
    server.log_path = out_dir / f"server-{server.name}.log"
    log = server.log_path.open("wb")
    server.proc = subprocess.Popen(
        pinned(server.argv, cpus),
        cwd=server.cwd,
        env=server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import httpx

    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{server.port}{server.ready_path}"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; see {server.log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"{server.name} not ready after {timeout_s}s; see {server.log_path}")


def place_tailer(server: Server, cpus: str | None) -> dict[str, Any]:
    """Moves the gateway's materialising child (TAILER_CMD) to `cpus`; None leaves it on the server's core."""
    assert server.proc is not None
    found: list[int] = []
    for pid in run_text(["pgrep", "-f", TAILER_CMD]).split():
        with contextlib.suppress(OSError, ValueError):
            if os.getsid(int(pid)) == server.proc.pid:
                found.append(int(pid))
    if cpus is None or not found:
        return {"pids": found, "cpus": "server", "moved": False}
    wanted = {int(c) for part in cpus.split(",") for c in (
        range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    for pid in found:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), wanted)
    return {"pids": found, "cpus": cpus, "moved": True}


def stop_server(server: Server) -> None:
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def server_pid(server: Server) -> int | None:
    """The process doing the work: the single child worker when the server forks one, else itself."""
    assert server.proc is not None
    children = run_text(["pgrep", "-P", str(server.proc.pid)]).split()
    return int(children[0]) if len(children) == 1 else server.proc.pid


def make_servers(
    systems: list[str],
    work: Path,
    api_keys: list[str],
    traffic: Traffic,
    gateway_exe: Path | None,
    gateway_data: Path | None,
    gateway_config: Path,
    gateway_base: Path | None = None,
) -> list[Server]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    servers: list[Server] = []
    for name in systems:
        port = free_port()
        if name in ("floor", "durable_floor"):
            app = "floor_app:app" if name == "floor" else "durable_floor_app:app"
            argv = [
                str(VENV_BIN / "granian"),
                "--interface",
                "rsgi",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--runtime-threads",
                "1",
                "--loop",
                "uvloop",
                "--no-ws",
                "--log-level",
                "warning",
                "--working-dir",
                str(BENCH),
                app,
            ]
            server_env = {**env, "DURABLE_FLOOR_FILE": str(work / "durable-floor.wal")}
            servers.append(Server(name, argv, port, server_env, BENCH))
        elif name == "baseline":
            config = {
                "merchants": {k: f"mer_bench_{i}" for i, k in enumerate(api_keys)},
                "blocklist": {
                    "payment_method": traffic.blocklisted_cards,
                    "email": traffic.blocklisted_emails,
                },
                "velocity_window_s": 60,
                "velocity_max": 1_000_000,
                "device_velocity_max": DEVICE_VELOCITY_MAX,
                "wal_path": str(work / "baseline-wal.log"),
                "rate_limit_per_s": 10_000_000,
            }
            cfg_path = work / "baseline-config.json"
            cfg_path.write_text(json.dumps(config))
            argv = [
                str(VENV_BIN / "uvicorn"),
                "--app-dir",
                str(BENCH),
                "baseline_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--log-level",
                "warning",
                "--no-access-log",
                "--workers",
                "1",
            ]
            servers.append(Server(name, argv, port, {**env, "BASELINE_CONFIG": str(cfg_path)}, REPO))
        elif name.startswith("gateway") and gateway_exe is not None and gateway_data is not None:
            data, extra = gateway_data, {}
            if name == "gateway_base":
                # The tree before a change (`git archive main python | tar -x -C DIR`, with the compiled
                # extension copied in), same CLI, config and merchants: the two run side by side.
                if gateway_base is None:
                    continue
                data = gateway_data.with_name("gateway-base-data")
                shutil.copytree(gateway_data, data)
                extra = {"PYTHONPATH": str(gateway_base)}
            argv = [
                str(gateway_exe),
                "serve",
                "--config",
                str(gateway_config),
                "--data-dir",
                str(data),
                "--port",
                str(port),
            ]
            # The payment worker (PSP calls, state machine, ledger) is the async path, not the fast path,
            # and the baseline has none: it is switched off so both measure the same request path.
            gw_env = {**env, "GATEWAY_ADMIN_KEY": BENCH_ADMIN_KEY, "GATEWAY_WORKER": "off"}
            servers.append(Server(name, argv, port, gw_env | extra, REPO))
    return servers


# --------------------------------------------------------------------------------------------- load


K6_SCRIPT = BENCH / "k6_open_loop.js"
# Mirrors k6_open_loop.js: log-spaced latency buckets, 10 per decade from 0.01 ms to 10 s.
HIST_MIN_MS = 0.01
HIST_PER_DECADE = 10
HIST_BUCKETS = 60
# k6 waits this long for in-flight requests after the step (request timeout 2 s plus a margin).
K6_GRACEFUL_STOP_S = 3.0
# A generator using this share of its cores' time was the bottleneck of the step, not the server.
GEN_SATURATED_CPU_SHARE = 0.9


def vus_for(rate: float, vus_max: int) -> int:
    """Pre-allocated VUs: enough for 100 ms of answers in flight at `rate`, at least 64, at most `vus_max`.

    Every VU is allocated before the step starts, so no VU is initialised while the step runs; a server
    that keeps `rate` x 100 ms requests in flight is far past a 10 ms P99 and its drops are its own.
    """
    return int(min(vus_max, max(64, rate * 0.1)))


def run_step(
    k6: Path,
    targets: Path,
    port: int,
    rate: float,
    seconds: float,
    run_id: str,
    cpus: str | None,
    server_cpus: str | None,
    vus_max: int,
    api_keys: list[str],
    work: Path,
) -> dict[str, Any]:
    """One offered rate with k6; returns the step's figures in the report's shape."""
    summary_path = work / f"k6-{run_id}.json"
    vus = vus_for(rate, vus_max)
    env = {
        **os.environ,
        "TARGETS": str(targets),
        "BASE": f"http://127.0.0.1:{port}",
        "RATE": str(int(rate)),
        "DURATION_S": f"{seconds:g}",
        "VUS": str(vus),
        "RUN": run_id,
        "TIMEOUT": "2s",
        "OK": OK_STATUSES,
        "API_KEYS": ",".join(api_keys),
        "SUMMARY": str(summary_path),
        # Fewer garbage collections: k6 allocates per request and memory is not the constraint here.
        "GOGC": "400",
        "K6_NO_USAGE_REPORT": "true",
    }
    argv = [str(k6), "run", "--quiet", "--no-usage-report", str(K6_SCRIPT)]
    log_path = work / f"k6-{run_id}.log"
    wall0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(pinned(argv, cpus), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        # k6 stops by itself (duration + graceful stop); this bound only guards against a hung process.
        deadline = wall0 + seconds + K6_GRACEFUL_STOP_S + 60
        # The generator's CPU time, sampled while it runs: its saturation during the step is a result.
        # So are the busy shares of the generator's and the server's cores (other processes included):
        # k6 can be starved on a shared core without using all of it itself.
        cpu_samples: list[tuple[float, float, dict[int, float]]] = []
        while proc.poll() is None:
            cpu = proc_cpu_s(proc.pid)
            if cpu is not None:
                cpu_samples.append((time.monotonic(), cpu, cores_busy_s()))
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
    exited = time.monotonic()
    stderr = log_path.read_text(errors="replace")
    if not summary_path.exists():
        raise RuntimeError(f"k6 wrote no summary (exit {proc.returncode}): {stderr.strip()[-500:]}")
    data = json.loads(summary_path.read_text())
    summary_path.unlink()
    # The step runs from (exit - test run duration) for `seconds`; k6's start-up (VUs, targets) is before.
    run_s = float(data.get("state", {}).get("testRunDurationMs", seconds * 1000)) / 1000
    step_cpu = cpu_between(cpu_samples, exited - run_s, exited - run_s + seconds)
    return step_from_k6(data, rate, seconds, vus, cpus, server_cpus, step_cpu)


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its threads, from /proc (None once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IOWAIT_KEY = -1


def cores_busy_s() -> dict[int, float]:
    """Busy (non-idle, non-iowait) seconds of every core since boot, from /proc/stat."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                ticks = [int(v) for v in vals[:8]]
                out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / tick
                # Key -1 sums every core's iowait: a server that waits on a disk shared with other
                # work (fsync) is slow with an idle core.
                out[IOWAIT_KEY] = out.get(IOWAIT_KEY, 0.0) + ticks[4] / tick
    return out


@dataclass
class StepCpu:
    wall_s: float
    k6_cpu_s: float
    cores_busy_s: dict[int, float]


def cpu_between(samples: list[tuple[float, float, dict[int, float]]], t0: float, t1: float) -> StepCpu | None:
    """CPU used between the samples nearest to t0 and t1: by k6, and by each core as a whole."""
    if len(samples) < 2:
        return None
    a = min(samples, key=lambda s: abs(s[0] - t0))
    b = min(samples, key=lambda s: abs(s[0] - t1))
    if b[0] - a[0] < 0.2:
        return None
    busy = {c: b[2][c] - a[2].get(c, 0.0) for c in b[2]}
    return StepCpu(b[0] - a[0], b[1] - a[1], busy)


def step_from_k6(
    data: dict[str, Any],
    rate: float,
    seconds: float,
    vus: int,
    cpus: str | None,
    server_cpus: str | None,
    step_cpu: StepCpu | None,
) -> dict[str, Any]:
    metrics: dict[str, Any] = data["metrics"]

    def values(name: str) -> dict[str, Any]:
        return dict(metrics.get(name, {}).get("values", {}))

    def count(name: str) -> int:
        return int(values(name).get("count", 0))

    def trend(name: str) -> dict[str, Any]:
        v = values(name)
        return {
            "p50_ms": round(v.get("p(50)", 0.0), 3),
            "p90_ms": round(v.get("p(90)", 0.0), 3),
            "p99_ms": round(v.get("p(99)", 0.0), 3),
            "p999_ms": round(v.get("p(99.9)", 0.0), 3),
            "max_ms": round(v.get("max", 0.0), 3),
            "mean_ms": round(v.get("avg", 0.0), 3),
            "count": int(v.get("count", 0)),
        }

    statuses: dict[str, int] = {}
    for name in metrics:
        if name.startswith("answers{s:"):
            n = count(name)
            if n:
                statuses[name[len("answers{s:") : -1]] = n
    sent = count("http_reqs")
    dropped = count("dropped_iterations")
    not_ok = count("not_ok")
    timeouts = count("timeouts")
    transport = count("transport_errors")
    answered = sent - timeouts - transport
    ok = sent - not_ok
    planned = int(rate * seconds)
    # Every scheduled iteration either was sent or was dropped; k6 schedules one at t = 0 too.
    scheduled = sent + dropped
    errors = not_ok + dropped
    run_s = max(float(data.get("state", {}).get("testRunDurationMs", seconds * 1000)) / 1000, seconds)
    # Answers arrive until the last in-flight request completes, at most the graceful stop after the step.
    answer_window_s = min(run_s, seconds + K6_GRACEFUL_STOP_S)
    hist_counts = [count(f"hist{{b:{b}}}") for b in range(HIST_BUCKETS + 2)]
    edges = [round(HIST_MIN_MS * 10 ** (b / HIST_PER_DECADE), 6) for b in range(HIST_BUCKETS + 1)]
    gen_cores = expand_cpus(cpus) if cpus else list(range(os.cpu_count() or 1))
    server_cores = expand_cpus(server_cpus) if server_cpus else list(range(os.cpu_count() or 1))
    gen_cpu_share = core_busy = server_busy = iowait = None
    if step_cpu:
        gen_cpu_share = round(step_cpu.k6_cpu_s / (step_cpu.wall_s * len(gen_cores)), 3)

        def busy(cores: list[int]) -> float:
            used = sum(step_cpu.cores_busy_s.get(c, 0.0) for c in cores)
            return round(min(used / (step_cpu.wall_s * len(cores)), 1.0), 3)

        core_busy = busy(gen_cores)
        server_busy = busy(server_cores)
        iowait = round(
            step_cpu.cores_busy_s.get(IOWAIT_KEY, 0.0) / (step_cpu.wall_s * (os.cpu_count() or 1)), 3
        )
    send_rate = sent / seconds
    fell_behind = send_rate < 0.95 * rate or dropped > KNEE_ERROR_RATE * max(scheduled, 1)
    return {
        "offered_rate": rate,
        "duration_s": seconds,
        "planned": planned,
        "scheduled": scheduled,
        "sent": sent,
        "dropped": dropped,
        "completed": answered,
        "send_rate": round(send_rate, 1),
        "achieved_rate": round(ok / answer_window_s, 1),
        "errors": errors,
        "error_rate": round(errors / max(scheduled, 1), 6),
        "status_counts": statuses,
        "error_kinds": {
            k: v
            for k, v in {
                "dropped_iterations": dropped,
                "timeout": timeouts,
                "transport": transport,
                "status": not_ok - timeouts - transport,
            }.items()
            if v
        },
        "latency_corrected": trend("latency_corrected"),
        "latency_uncorrected": trend("http_req_duration"),
        "send_lag": trend("gen_lag"),
        "histogram_edges_ms": edges,
        "histogram_counts": hist_counts,
        "generator": {
            "vus": vus,
            "cores": gen_cores,
            # Share of the generator's cores' time k6 used during the step (start-up excluded), and
            # how busy those cores were with everything (k6 and any other process on them).
            "cpu_share": gen_cpu_share,
            "cores_busy_share": core_busy,
            # k6 fell behind its schedule (sent < 95% of the rate, or dropped iterations) while its
            # cores were full: the step measures the generator, the rate was not actually offered.
            "saturated": bool(fell_behind and core_busy is not None and core_busy >= GEN_SATURATED_CPU_SHARE),
        },
        "server_cores_busy_share": server_busy,
        # Share of all cores' time spent waiting for I/O during the step (every process's, not only
        # the server's): high values mean fsync latency from a disk shared with other work.
        "machine_iowait_share": iowait,
    }


def expand_cpus(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def run_oha_step(
    oha: Path,
    targets: Path,
    port: int,
    rate: float,
    seconds: float,
    cpus: str | None,
    connections: int,
    api_keys: list[str],
) -> dict[str, Any]:
    """The same offered rate with oha (static body and headers: the first target's), for a cross-check."""
    merchant, _, body = json.loads(targets.read_text())[0]
    body_file = targets.with_name("oha-body.json")
    body_file.write_text(body)
    argv = [
        str(oha),
        "-q",
        str(rate),
        "-z",
        f"{seconds}s",
        "--latency-correction",
        "--no-tui",
        "--output-format",
        "json",
        "-c",
        str(connections),
        "-m",
        "POST",
        "-D",
        str(body_file),
        "-T",
        "application/json",
        "-H",
        f"Authorization: Bearer {api_keys[merchant]}",
        "-t",
        "2s",
        f"http://127.0.0.1:{port}/v1/payments",
    ]
    proc = subprocess.run(
        pinned(argv, cpus), capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if proc.returncode != 0:
        return {"offered_rate": rate, "error": proc.stderr.strip()[-300:]}
    data = json.loads(proc.stdout)
    pct = data.get("latencyPercentiles", {})

    def ms(key: str) -> float | None:
        v = pct.get(key)
        return round(v * 1000, 3) if v is not None else None

    return {
        "offered_rate": rate,
        "achieved_rate": round(data["summary"]["requestsPerSec"], 1),
        "success_rate": data["summary"]["successRate"],
        "p50_ms": ms("p50"),
        "p99_ms": ms("p99"),
        "p999_ms": ms("p99.9"),
        "status_counts": data.get("statusCodeDistribution", {}),
    }


def run_oha_series(oha: Path, server: Server, targets: Path, api_key: str, args: argparse.Namespace,
                   plan: dict[str, Any], work: Path) -> dict[str, Any]:
    """Plain creates with oha at `--oha-rates` until the server (or oha) clearly saturates."""
    bodies = oha_creates.write_bodies(targets, work / "oha-bodies.jsonl")
    steps: list[dict[str, Any]] = []
    for rate in [float(r) for r in args.oha_rates.split(",") if r]:
        time.sleep(0.5)
        step = oha_creates.run_step(oha, bodies, api_key, server.port, rate, args.step_seconds or 4.0,
                                    plan["generator_cpus"], vus_for(rate, args.vus), cores_busy_s)
        steps.append(step)
        print(f"      oha plain creates {server.name} offered {fmt_rate(rate)}/s: {step}", flush=True)
        if "error" in step or step["achieved_rate"] < 0.8 * rate or (step["p50_ms"] or 0) > 1000:
            break
    return {"steps": steps, "knee_p50": oha_creates.knee(steps),
            "generator_saturated_at": [s["offered_rate"] for s in steps if s.get("generator_saturated")]}


def knee(steps: list[dict[str, Any]]) -> float | None:
    """Highest offered rate with P99 under the bound and errors under the bound (None if no step passes)."""
    passing = [
        s["offered_rate"]
        for s in steps
        if s["latency_corrected"]["p99_ms"] < KNEE_P99_MS and s["error_rate"] < KNEE_ERROR_RATE
    ]
    return max(passing) if passing else None


def knee_p50(steps: list[dict[str, Any]]) -> float | None:
    """Highest offered rate served at >= 95% with errors < 0.1% and P50 < KNEE_P50_MS."""
    passing = [
        s["offered_rate"]
        for s in steps
        if s["achieved_rate"] >= 0.95 * s["offered_rate"]
        and s["error_rate"] < KNEE_ERROR_RATE
        and s["latency_corrected"]["p50_ms"] < KNEE_P50_MS
    ]
    return max(passing) if passing else None


def capacity(steps: list[dict[str, Any]]) -> float | None:
    """Highest offered rate fully served: achieved >= 95% of offered and errors < 0.1%, whatever the latency.

    Reported beside the knee because on a small or busy machine scheduling noise alone can push P99
    past 10 ms at any rate; capacity still compares the systems' throughput honestly.
    """
    passing = [
        s["offered_rate"]
        for s in steps
        if s["achieved_rate"] >= 0.95 * s["offered_rate"] and s["error_rate"] < KNEE_ERROR_RATE
    ]
    return max(passing) if passing else None


def py_spy_profile(pid: int, seconds: float, out_dir: Path, name: str) -> dict[str, Any]:
    """Sample the server for `seconds`; writes a flame graph and the collapsed stacks, returns top frames."""
    exe = VENV_BIN / "py-spy"
    if not exe.exists():
        return {"error": "py-spy not installed"}
    raw = out_dir / f"profile-{name}.txt"
    svg = out_dir / f"profile-{name}.svg"
    base = [
        str(exe),
        "record",
        "--subprocesses",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "250",
        "--nonblocking",
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for cmd in ([*base, "--format", "raw", "-o", str(raw)], [*base, "-o", str(svg)])
    ]
    return {"raw": raw.name, "svg": svg.name, "_procs": procs}


def summarise_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Sample shares from py-spy's collapsed stacks: per function (self and inclusive) and per thread role.

    Shares are of all samples taken across the process's threads; a thread inside Rust or a system
    call with the GIL released still counts as busy, so I/O waits such as fsync show up too.
    """
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    roles: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return {"error": "no samples"}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        # With --subprocesses py-spy roots every stack at a "process N:..." frame; it names no function.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f and not f.startswith("process ")]
        role = "other (HTTP runtime, native)"
        if any(f.startswith("Tailer.") for f in frames):
            role = "WAL tailer thread"
        elif any(f.startswith("Worker.") and "pipeline" in f for f in frames):
            role = "async pipeline workers (state machine, PSP, store)"
        elif any("__rsgi__" in f or "_cbsched" in f for f in frames):
            role = "request handling (event loop)"
        roles[role] = roles.get(role, 0) + count
        for f in set(frames):
            incl_counts[f] = incl_counts.get(f, 0) + count
        leaf = frames[-1] if frames else "(no Python frame: native code)"
        self_counts[leaf] = self_counts.get(leaf, 0) + count
    if total == 0:
        return {"error": "no samples"}

    def ranked(d: dict[str, int]) -> list[dict[str, Any]]:
        items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [{"frame": k, "share": round(v / total, 4)} for k, v in items]

    return {
        "samples": total,
        "by_role": ranked(roles),
        "top_self": ranked(self_counts),
        "top_inclusive": ranked(incl_counts),
    }


# --------------------------------------------------------------------------------------------- report


def fmt_share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def versions_k6(k6: Path) -> str:
    out = run_text([str(k6), "version"]).split()
    return out[1] if len(out) > 1 else "unknown"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "none"
    return f"{x / 1000:.1f}K" if x >= 1000 else f"{x:.0f}"


def oha_ratio(results: dict[str, Any], a: str, b: str) -> float | None:
    ka = results.get(a, {}).get("oha_creates", {}).get("knee_p50")
    kb = results.get(b, {}).get("oha_creates", {}).get("knee_p50")
    return round(ka / kb, 3) if ka and kb else None


def oha_lines(report: dict[str, Any]) -> list[str]:
    """The plain-create series of every system (oha), with the generator's saturation marked."""
    lines = ["", ("Plain creates with oha (`-Z`: a body per request, no Idempotency-Key; knee: served >= 95%, "
             "errors < 0.1%, P50 < 5 ms):"), "",
             "| system | knee | offered | sent | achieved | P50 ms | P99 ms | P99.9 ms | errors | oha core busy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in report["systems"].items():
        series = res.get("oha_creates")
        if not series:
            continue
        for i, st in enumerate(series["steps"]):
            head = f"| {name if i == 0 else ''} | {fmt_rate(series['knee_p50']) if i == 0 else ''} | "
            if "error" in st:
                lines.append(head + f"{fmt_rate(st['offered_rate'])} | oha failed: {st['error']} | | | | | | |")
                continue
            lines.append(head + f"{fmt_rate(st['offered_rate'])} | {fmt_rate(st['sent_rate'])} | "
                         f"{fmt_rate(st['achieved_rate'])} | {st['p50_ms']} | {st['p99_ms']} | {st['p999_ms']} | "
                         f"{st['error_rate']:.2%} | {fmt_share(st['generator_core_busy_share'])}"
                         f"{' (oha saturated)' if st['generator_saturated'] else ''} |")
    r = report["ratios"]
    lines += ["", (f"oha knees: gateway / durable floor = {r.get('oha_knee_gateway_over_durable_floor')}, "
              f"gateway / floor = {r.get('oha_knee_gateway_over_floor')}"
              + (f"; the tree before the change (gateway_base) / durable floor = "
                 f"{r.get('oha_knee_gateway_base_over_durable_floor')}, gateway / gateway_base = "
                 f"{r.get('oha_knee_gateway_over_gateway_base')}" if "gateway_base" in report["systems"] else "")
              + ".")]
    return lines if len(lines) > 8 else []


def fsync_cells(step: dict[str, Any]) -> str:
    """The step's disk probe P99/max and the gateway's WAL fsync P99/max (bucket bounds), for the table."""
    f = step.get("fsync", {})
    probe, wal = f.get("disk_probe", {}), f.get("gateway_wal", {})
    cell = f"{probe.get('p99_ms', '-')} / {probe.get('max_ms', '-')}"
    wal_cell = f"{wal.get('p99_ms_le', '-')} / {wal.get('max_ms_le', '-')}" if wal else "-"
    return f"{cell} | {wal_cell}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        f"# HTTP benchmark {report['started_at']}",
        "",
        (
            f"Machine: {report['machine']['cpu_model']}, {report['machine']['cores']} cores, "
            f"{report['machine']['memory_gib']} GiB, kernel {report['machine']['kernel']}; load average at "
            f"start {report['machine']['load_average_at_start']}. Pinning: {report['cpu_plan']}."
        ),
        (
            f"Open loop, {report['config']['step_seconds']} s per offered rate, latency from intended send time "
            f"(coordinated omission corrected). Knee = highest offered rate with P99 < {KNEE_P99_MS:g} ms and "
            f"errors < {KNEE_ERROR_RATE:.1%}."
        ),
        "",
        (
            "| system | knee | capacity | offered | sent | achieved | P50 ms | P99 ms | P99.9 ms | errors "
            "| dropped | gen lag P99 ms | k6 CPU / its core busy | server core busy | disk fsync P99 / max ms "
            "| WAL fsync P99 / max ms (<=) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in report["systems"].items():
        if "error" in res:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | {res['error']} | - | - | - | - | - | - |")
            continue
        for i, s in enumerate(res["steps"]):
            lat = s["latency_corrected"]
            lines.append(
                f"| {name if i == 0 else ''} | {fmt_rate(res['knee']) if i == 0 else ''} | "
                f"{fmt_rate(res['capacity']) if i == 0 else ''} | "
                f"{fmt_rate(s['offered_rate'])} | {fmt_rate(s['send_rate'])} | {fmt_rate(s['achieved_rate'])} | "
                f"{lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | {lat['p999_ms']:.2f} | {s['error_rate']:.2%} | "
                f"{s['dropped']} | {s['send_lag']['p99_ms']:.2f} | {fmt_share(s['generator']['cpu_share'])} / "
                f"{fmt_share(s['generator']['cores_busy_share'])}"
                f"{' (k6 saturated)' if s['generator']['saturated'] else ''} | "
                f"{fmt_share(s['server_cores_busy_share'])} | {fsync_cells(s)} |"
            )
        why = (
            f"k6 could not offer {fmt_rate(res.get('saturated_at'))}"
            if res.get("saturated_by") == "generator"
            else f"server saturated at {fmt_rate(res.get('saturated_at'))}"
        )
        for skipped in res.get("skipped_rates", []):
            lines.append(f"| | | | {fmt_rate(skipped)} | skipped: {why} | | | | | | | | | | | |")
    ratios = report["ratios"]
    lines += [
        "",
        (
            f"Ratios: gateway knee / floor knee = {ratios['gateway_over_floor']}, "
            f"gateway knee / baseline knee = {ratios['gateway_over_baseline']}; capacity (highest offered "
            f"rate served in full, any latency): gateway / floor = {ratios['capacity_gateway_over_floor']}, "
            f"gateway / baseline = {ratios['capacity_gateway_over_baseline']}. Durable floor (same bare server, "
            f"each 201 after a group-committed fsync): gateway knee / durable floor knee = "
            f"{ratios.get('gateway_over_durable_floor')}, capacity ratio "
            f"{ratios.get('capacity_gateway_over_durable_floor')}; knee with the P50 < {KNEE_P50_MS:g} ms "
            f"definition (served >= 95%, errors < 0.1%): "
            + ", ".join(f"{n} {fmt_rate(r.get('knee_p50'))}" for n, r in report["systems"].items() if "steps" in r)
            + "."
        ),
        "",
        (
            "Errors count k6's dropped iterations (no free VU at the scheduled start), transport failures, "
            f"timeouts (2 s) and statuses outside {{{OK_STATUSES}}}; 402 (risk decline), 409 (retry while "
            "in flight) and replays are correct answers to the planned traffic. `sent` is the rate k6 "
            "actually sent, `gen lag` how late it started iterations, `k6 CPU` the share of its "
            "core(s) it used during the step and `its core busy` how busy those core(s) were with "
            "everything (other processes on a shared machine included). A step where k6 fell behind "
            "(sent < 95% or dropped iterations) while its core was 90%+ busy measures the generator: "
            "that offered rate was not actually offered (marked `k6 saturated`)."
        ),
    ]
    lines += oha_lines(report)
    oha_steps = report["systems"].get("floor", {}).get("oha_steps")
    if oha_steps:
        lines += [
            "",
            "Cross-check of the floor with oha (static body and headers, `--latency-correction`):",
            "",
            "| offered | achieved | P50 ms | P99 ms | P99.9 ms | success |",
            "|---|---|---|---|---|---|",
        ]
        for o in oha_steps:
            if "error" in o:
                lines.append(f"| {fmt_rate(o['offered_rate'])} | oha failed: {o['error']} | | | | |")
            else:
                lines.append(
                    f"| {fmt_rate(o['offered_rate'])} | {fmt_rate(o['achieved_rate'])} | {o['p50_ms']} | "
                    f"{o['p99_ms']} | {o['p999_ms']} | {o['success_rate']:.2%} |"
                )
    for name, res in report["systems"].items():
        prof = res.get("profile", {}).get("summary", {})
        if prof.get("top_self"):
            lines += [
                "",
                (
                    f"py-spy profile of {name} at {fmt_rate(res['profile']['rate'])} req/s "
                    f"({prof['samples']} samples; flame graph {res['profile']['svg']}):"
                ),
            ]
            lines += [f"- {r['share']:.1%} {r['frame']}" for r in prof["by_role"]]
            lines += ["", "Top functions (self):"] + [
                f"- {r['share']:.1%} {r['frame']}" for r in prof["top_self"][:8]
            ]
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    path.write_text("\n".join(lines) + "\n")


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (key, label) in zip(
        axes, [("p50_ms", "P50"), ("p99_ms", "P99"), ("p999_ms", "P99.9")], strict=True
    ):
        for name, res in report["systems"].items():
            steps = res.get("steps", [])
            if steps:
                ax.plot(
                    [s["offered_rate"] for s in steps],
                    [max(s["latency_corrected"][key], 1e-3) for s in steps],
                    marker="o",
                    label=name,
                )
        ax.axhline(KNEE_P99_MS, color="grey", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("offered rate (req/s, log)")
        ax.set_title(f"{label} latency (corrected)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency_vs_rate.png", dpi=110)
    plt.close(fig)
    written.append("latency_vs_rate.png")

    target = report["config"]["histogram_rate"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    chosen = None
    for name, res in report["systems"].items():
        steps = res.get("steps", [])
        if not steps:
            continue
        step = min(steps, key=lambda s: abs(s["offered_rate"] - target))
        chosen = step["offered_rate"]
        edges = np.array(step["histogram_edges_ms"])
        counts = np.array(step["histogram_counts"][1:-1], dtype=float)
        total = max(sum(step["histogram_counts"]), 1)
        ax.stairs(counts / total, edges, label=f"{name} @ {fmt_rate(step['offered_rate'])}")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"Latency histogram near {fmt_rate(chosen or target)} req/s")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_histogram.png", dpi=110)
    plt.close(fig)
    written.append("latency_histogram.png")
    return written


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny rates and short steps: a smoke test")
    p.add_argument("--rates", help="comma-separated offered rates, req/s")
    p.add_argument("--step-seconds", type=float, help="seconds per offered rate")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="subset of floor,gateway,baseline")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<timestamp>)")
    p.add_argument(
        "--vus",
        type=int,
        default=512,
        help="k6 VUs (= concurrent requests and connections) at most; a step pre-allocates min(this, rate x 0.1 s)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--keep-going", action="store_true", help="run every rate even after saturation")
    p.add_argument("--oha", action="store_true", help="cross-check every floor step with oha (if installed)")
    p.add_argument("--profile", default="", help="systems to sample with py-spy at --profile-rate")
    p.add_argument("--profile-rate", type=float, default=0, help="offered rate to profile at (default: knee)")
    p.add_argument("--gateway-config", type=Path, default=BENCH / "gateway-bench.toml")
    p.add_argument("--gateway-base", type=Path,
                   help="system gateway_base: the gateway from this python/ tree (PYTHONPATH), e.g. main's")
    p.add_argument("--tailer-on-generator-cores", action="store_true",
                   help="move the gateway's materialising child to the generator's cores (default: server's)")
    p.add_argument("--histogram-rate", type=float, default=50_000)
    p.add_argument("--oha-rates", default="1000,2500,5000,7500,10000,15000,20000,30000",
                   help="rates of the plain-create steps with oha (bench/oha_creates.py) per system; '' skips them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rates = (
        [float(r) for r in args.rates.split(",")]
        if args.rates
        else (QUICK_RATES if args.quick else DEFAULT_RATES)
    )
    step_seconds = args.step_seconds or (1.5 if args.quick else 4.0)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        print(f"unknown systems: {sorted(unknown)}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    out_dir = args.out or BENCH / "results" / started.strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=str(out_dir)))
    k6 = ensure_tools()
    machine = machine_info()
    plan = cpu_plan(machine["cores"] or 1, args.no_pin)
    traffic = Traffic()
    notes: list[str] = []
    if machine["load_average_at_start"][0] > 0.5 * (machine["cores"] or 1):
        notes.append(
            f"the machine was busy at start (load average {machine['load_average_at_start'][0]}): "
            "figures are noisy and lower than on an idle machine"
        )

    wants_gateway = any(s.startswith("gateway") for s in systems)
    gateway_exe = gateway_cli() if wants_gateway else None
    gateway_data: Path | None = None
    results: dict[str, Any] = {}
    if wants_gateway and gateway_exe is None:
        results["gateway"] = {"error": "gateway CLI not installed (run `make install`)"}
    api_keys: list[str]
    if gateway_exe is not None:
        gateway_data = work / "gateway-data"
        gateway_data.mkdir()
        try:
            api_keys = create_gateway_merchants(
                gateway_exe, gateway_data, traffic.merchants, args.gateway_config
            )
        except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
            results["gateway"] = {"error": f"merchant create failed: {exc}"}
            gateway_exe = None
            api_keys = [f"sk_bench_{i}" for i in range(traffic.merchants)]
    else:
        api_keys = [f"sk_bench_{i}" for i in range(traffic.merchants)]

    count = int(min(traffic.targets_max, max(rates) * step_seconds))
    targets = work / "targets.json"
    t0 = time.monotonic()
    mix = build_targets(targets, traffic, api_keys, max(count, 1000))
    print(
        f"bench: {mix['targets']} targets built in {time.monotonic() - t0:.1f}s; results in {out_dir}",
        flush=True,
    )

    if "gateway_base" in systems and args.gateway_base is None:
        results["gateway_base"] = {"error": "no --gateway-base DIR given"}
    servers = make_servers(systems, work, api_keys, traffic, gateway_exe, gateway_data, args.gateway_config,
                           args.gateway_base)
    total_steps = len(servers) * len(rates)
    done = 0
    bench_start = time.monotonic()
    profile_systems = {s for s in args.profile.split(",") if s}
    try:
        for server in servers:
            res: dict[str, Any] = {"steps": [], "skipped_rates": [], "command": server.argv}
            is_gateway = server.name.startswith("gateway")
            results[server.name] = res
            try:
                start_server(server, plan["server_cpus"], out_dir)
            except RuntimeError as exc:
                results[server.name] = {"error": str(exc)}
                done += len(rates)
                continue
            if is_gateway:
                res["tailer"] = place_tailer(server, plan["generator_cpus"] if args.tailer_on_generator_cores else None)
                res["risk"] = load_gateway_risk(server.port, traffic, DEVICE_VELOCITY_MAX)
                if not res["risk"]["loaded"]:
                    notes.append(
                        f"gateway ran with no risk rules: loading them failed ({res['risk']['error']})"
                    )
                print(f"bench: gateway risk policy: {res['risk']}", flush=True)
            try:
                # Warm-up: connections, caches and JIT-free but lazy imports, at the lowest rate.
                run_step(
                    k6,
                    targets,
                    server.port,
                    min(rates[0], 1000),
                    1.0,
                    f"warm-{server.name}",
                    plan["generator_cpus"],
                    plan["server_cpus"],
                    args.vus,
                    api_keys,
                    work,
                )
                saturated = False
                for rate in rates:
                    done += 1
                    if saturated:
                        res["skipped_rates"].append(rate)
                        continue
                    elapsed = time.monotonic() - bench_start
                    print(
                        f"[{done}/{total_steps}] {server.name:8s} offered {fmt_rate(rate):>6s} req/s "
                        f"for {step_seconds:g}s  (elapsed {elapsed:.0f}s)",
                        flush=True,
                    )
                    profile: dict[str, Any] | None = None
                    want_profile = server.name in profile_systems and (
                        (args.profile_rate and abs(rate - args.profile_rate) < 1)
                        or (not args.profile_rate and rate == rates[len(rates) // 2])
                    )
                    if want_profile and server.proc is not None:
                        # The whole process tree: HTTP workers, pipeline workers and helpers alike.
                        profile = py_spy_profile(server.proc.pid, step_seconds, out_dir, server.name)
                    url = f"http://127.0.0.1:{server.port}"
                    wal_before = gateway_fsync_histogram(url, 1) if is_gateway else {}
                    with FsyncProbe(work, FSYNC_PROBE_INTERVAL_S) as probe:
                        step = run_step(
                            k6,
                            targets,
                            server.port,
                            rate,
                            step_seconds,
                            f"{server.name}-{int(rate)}",
                            plan["generator_cpus"],
                            plan["server_cpus"],
                            args.vus,
                            api_keys,
                            work,
                        )
                    step["fsync"] = {"disk_probe": probe.summary()}
                    if is_gateway:
                        step["fsync"]["gateway_wal"] = histogram_delta(wal_before, gateway_fsync_histogram(url, 1))
                    if profile is not None:
                        for p in profile.pop("_procs"):
                            p.wait(timeout=step_seconds + 30)
                        profile["summary"] = summarise_profile(out_dir / profile["raw"])
                        profile["rate"] = rate
                        res["profile"] = profile
                    res["steps"].append(step)
                    oha = TOOLS_BIN / "oha"
                    if args.oha and server.name == "floor" and oha.exists():
                        time.sleep(0.5)
                        res.setdefault("oha_steps", []).append(
                            run_oha_step(
                                oha,
                                targets,
                                server.port,
                                rate,
                                step_seconds,
                                plan["generator_cpus"],
                                vus_for(rate, args.vus),
                                api_keys,
                            )
                        )
                    lat = step["latency_corrected"]
                    gen = step["generator"]
                    print(
                        f"      sent {fmt_rate(step['send_rate'])}/s  achieved {fmt_rate(step['achieved_rate'])}/s  "
                        f"P50 {lat['p50_ms']:.2f}  P99 {lat['p99_ms']:.2f}  P99.9 {lat['p999_ms']:.2f} ms  "
                        f"errors {step['error_rate']:.2%} (dropped {step['dropped']})  k6 CPU "
                        f"{fmt_share(gen['cpu_share'])} (core busy {fmt_share(gen['cores_busy_share'])})"
                        f"{' K6 SATURATED' if gen['saturated'] else ''}  server core busy "
                        f"{fmt_share(step['server_cores_busy_share'])}  "
                        f"statuses {step['status_counts']}",
                        flush=True,
                    )
                    # Clearly saturated: a fifth of the requests failed, half waited over a second, or
                    # k6 on its full core sent under 90% of the rate (a higher rate would not be
                    # offered either).
                    generator_capped = gen["saturated"] and step["send_rate"] < 0.9 * rate
                    if not args.keep_going and (
                        step["error_rate"] > 0.2 or lat["p50_ms"] > 1000 or generator_capped
                    ):
                        saturated = True
                        res["saturated_by"] = "generator" if generator_capped else "server"
                        res["saturated_at"] = rate
                    time.sleep(0.5)
                oha = TOOLS_BIN / "oha"
                if args.oha_rates and oha.exists():
                    res["oha_creates"] = run_oha_series(oha, server, targets, api_keys[0], args, plan, work)
                res["knee"] = knee(res["steps"])
                res["capacity"] = capacity(res["steps"])
                res["knee_p50"] = knee_p50(res["steps"])
                if is_gateway:
                    import httpx

                    with contextlib.suppress(httpx.HTTPError):
                        metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
                        (out_dir / f"{server.name}-metrics.txt").write_text(metrics)
                        res["metrics_file"] = f"{server.name}-metrics.txt"
            finally:
                stop_server(server)
    finally:
        for server in servers:
            stop_server(server)

    def ratio(a: str, b: str, key: str = "knee") -> float | None:
        ka = results.get(a, {}).get(key)
        kb = results.get(b, {}).get(key)
        return round(ka / kb, 3) if ka and kb else None

    for name, res in results.items():
        if "steps" not in res:
            continue
        not_offered = [s["offered_rate"] for s in res["steps"] if s["generator"]["saturated"]]
        if not_offered:
            notes.append(
                f"{name}: k6 did not actually offer {', '.join(fmt_rate(r) for r in not_offered)} req/s: it "
                "fell behind its schedule (sent < 95% of the rate or dropped iterations) while its core(s) "
                f"{plan['generator_cpus'] or 'all'} were 90%+ busy, so the generator limited those rows "
                "(the server may have been saturated too: see its core busy share)"
                + (
                    f"; {', '.join(fmt_rate(r) for r in res['skipped_rates'])} were not run"
                    if res.get("skipped_rates")
                    else ""
                )
            )
        io_bound = [s["offered_rate"] for s in res["steps"] if (s["machine_iowait_share"] or 0) > 0.1]
        if io_bound:
            notes.append(
                f"{name}: the machine spent over 10% of its time in iowait at "
                f"{', '.join(fmt_rate(r) for r in io_bound)} req/s (machine_iowait_share): fsync latency "
                "from a shared disk, not CPU, may have limited those rows"
            )
        late = [
            s["offered_rate"]
            for s in res["steps"]
            if s["send_lag"]["p99_ms"] > 1.0 and not s["generator"]["saturated"] and not s["dropped"]
        ]
        if late:
            notes.append(
                f"{name}: k6 started iterations late (P99 lag > 1 ms) at {', '.join(fmt_rate(r) for r in late)} "
                "req/s; the corrected latency includes that lag, so those rows are pessimistic"
            )
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - bench_start, 1),
        "machine": machine,
        "versions": versions(),
        "cpu_plan": plan,
        "config": {
            "rates": rates,
            "step_seconds": step_seconds,
            "quick": args.quick,
            "systems": systems,
            "vus_max": args.vus,
            "ok_statuses": OK_STATUSES,
            "knee_p99_ms": KNEE_P99_MS,
            "knee_error_rate": KNEE_ERROR_RATE,
            "histogram_rate": args.histogram_rate,
            "gateway_config": str(args.gateway_config.relative_to(REPO))
            if args.gateway_config.is_relative_to(REPO)
            else str(args.gateway_config),
            "traffic": {k: v for k, v in traffic.__dict__.items() if not isinstance(v, list)}
            | {"realised": mix},
            "load_generator": (
                f"k6 {versions_k6(k6)} constant-arrival-rate (open loop) via bench/k6_open_loop.js; latency "
                "from intended send time; dropped iterations count as errors"
            ),
            "baseline_durability": "group commit: append + fsync per batch (<= 1 ms or 256 records)",
        },
        "systems": results,
        "ratios": {
            "gateway_over_floor": ratio("gateway", "floor"),
            "gateway_over_durable_floor": ratio("gateway", "durable_floor"),
            "capacity_gateway_over_durable_floor": ratio("gateway", "durable_floor", "capacity"),
            "oha_knee_gateway_over_durable_floor": oha_ratio(results, "gateway", "durable_floor"),
            "oha_knee_gateway_over_floor": oha_ratio(results, "gateway", "floor"),
            "oha_knee_gateway_base_over_durable_floor": oha_ratio(results, "gateway_base", "durable_floor"),
            "oha_knee_gateway_over_gateway_base": oha_ratio(results, "gateway", "gateway_base"),
            "gateway_over_baseline": ratio("gateway", "baseline"),
            "capacity_gateway_over_floor": ratio("gateway", "floor", "capacity"),
            "capacity_gateway_over_baseline": ratio("gateway", "baseline", "capacity"),
        },
        "notes": notes,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out_dir / "report.md")
    if not args.no_plots:
        report["plots"] = write_plots(report, out_dir)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with contextlib.suppress(OSError):
        (work / "targets.json").unlink()
    print((out_dir / "report.md").read_text())
    print(f"bench: report in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
