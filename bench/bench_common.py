"""What several benches share: timing a set of threads and saving a JSON report under bench/results/.

Imported by the bench scripts as a sibling module (`python bench/<name>.py` puts bench/ first on the
module path).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_threads_s(threads: Sequence[threading.Thread]) -> float:
    """Starts every thread, waits until all have finished and returns the wall time in seconds: the
    clock starts before the first start, so the threads' start-up counts as part of the work."""
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def write_report(path: Path, report: object) -> Path:
    """Writes the report as indented JSON to the path (creating its folder) and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def save_report(bench: str, report: object) -> Path:
    """Writes the report to bench/results/<bench>-<unix time>.json, so every run keeps its own file."""
    return write_report(RESULTS_DIR / f"{bench}-{int(time.time())}.json", report)
