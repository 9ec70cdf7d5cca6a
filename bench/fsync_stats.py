"""The disk's fsync latency during a benchmark step, two ways, for the reports of the HTTP benchmarks.

- `FsyncProbe`: a thread that appends 4 KiB to a file of its own on the same file system and
  fdatasyncs it every `interval_s`, recording each fdatasync's exact duration (what any durable
  acknowledgement on this disk pays, whatever the gateway does).
- `gateway_fsync_histogram` / `histogram_delta`: the gateway's own `gateway_wal_fsync_seconds`
  histogram, scraped from every process behind a port before and after a step; the difference is the
  distribution of the WAL fsyncs of that step (P99 and max as bucket upper bounds).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx

STALL_MS = 100.0
PROBE_BYTES = 4096
_BUCKET = re.compile(r'^gateway_wal_fsync_seconds_bucket\{le="([^"]+)"\} (\d+)$', re.MULTILINE)
_SLOT = re.compile(r"^gateway_cluster_slot (\d+)$", re.MULTILINE)


def _pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


class FsyncProbe:
    def __init__(self, folder: Path, interval_s: float = 0.005) -> None:
        self.path = folder / "fsync-probe.dat"
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fsync-probe", daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        block = b"\0" * PROBE_BYTES
        try:
            while not self._stop.is_set():
                os.write(fd, block)
                t = time.perf_counter()
                os.fdatasync(fd)
                self.samples_ms.append((time.perf_counter() - t) * 1000)
                self._stop.wait(self.interval_s)
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples_ms)
        return {"fsyncs": len(s), "p50_ms": round(_pct(s, 0.5), 3), "p99_ms": round(_pct(s, 0.99), 3),
                "max_ms": round(s[-1], 3) if s else 0.0,
                "over_100ms": sum(1 for v in s if v > STALL_MS)}


def gateway_fsync_histogram(url: str, processes: int, timeout_s: float = 20.0) -> dict[str, dict[float, int]]:
    """Cumulative bucket counts of `gateway_wal_fsync_seconds` per process (by WAL slot; "0" for an
    embedded gateway), scraping with a new connection each time until every process has answered."""
    out: dict[str, dict[float, int]] = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < processes and time.monotonic() < deadline:
        try:
            with httpx.Client(timeout=5) as c:
                text = c.get(f"{url}/metrics").text
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        slot = _SLOT.search(text)
        out[slot.group(1) if slot else "0"] = {
            float("inf") if le == "+Inf" else float(le): int(n) for le, n in _BUCKET.findall(text)}
    return out


def histogram_delta(before: dict[str, dict[float, int]], after: dict[str, dict[float, int]]) -> dict[str, Any]:
    """The WAL fsyncs between two scrapes, all processes together: count, and the P50/P99/max as the
    upper bound (ms) of the bucket that holds them ("inf": above the largest bound, 1 s)."""
    cum: dict[float, int] = {}
    for slot, buckets in after.items():
        for le, n in buckets.items():
            cum[le] = cum.get(le, 0) + n - before.get(slot, {}).get(le, 0)
    bounds = sorted(cum)
    total = cum.get(float("inf"), 0)
    if not bounds or total <= 0:
        return {"fsyncs": 0}

    def bound_of(rank: float) -> float | str:
        for le in bounds:
            if cum[le] >= rank:
                return "inf" if le == float("inf") else round(le * 1000, 3)
        return "inf"

    top = next(le for le in bounds if cum[le] >= total)
    over_100ms = total - max((cum[le] for le in bounds if le <= STALL_MS / 1000), default=0)
    return {"fsyncs": total, "p50_ms_le": bound_of(total * 0.5), "p99_ms_le": bound_of(total * 0.99),
            "max_ms_le": "inf" if top == float("inf") else round(top * 1000, 3), "over_100ms": over_100ms}
