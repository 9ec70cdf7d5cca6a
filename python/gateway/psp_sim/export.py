"""Settlement files of the in-process simulators, written where an operator finds them.

In embedded mode the simulated PSPs live inside the worker process, so nobody can download their
settlement files over HTTP (`gateway psp-sim` serves them at `/v1/{psp}/settlement/{day}.csv`).
`SettlementExporter` writes them instead, as `<data_dir>/settlements/<psp>-<YYYY-MM-DD>.csv`, every
`interval_s` and once more when the process exits, each file atomically (temporary file, then
rename), so `gateway reconcile settlement --file` never reads half a file. Only the days that got
new lines since the last export are written again.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from datetime import date
from pathlib import Path

from .core import SimulatedPSP
from .settlement import settlement_csv

log = logging.getLogger("gateway.psp_sim.export")

EXPORT_INTERVAL_S_DEFAULT = 5.0
EXPORT_INTERVAL_S_MIN = 0.1


def settlement_path(directory: Path, psp: str, day: date) -> Path:
    return directory / f"{psp}-{day.isoformat()}.csv"


class SettlementExporter:
    """Writes the simulators' daily settlement files into `directory` (see the module's docstring)."""

    def __init__(self, sims: Mapping[str, SimulatedPSP], directory: str | Path,
                 interval_s: float = EXPORT_INTERVAL_S_DEFAULT) -> None:
        assert interval_s >= EXPORT_INTERVAL_S_MIN, f"interval_s must be >= {EXPORT_INTERVAL_S_MIN}"
        self.sims = dict(sims)
        self.directory = Path(directory)
        self.interval_s = interval_s
        # (psp, day) -> lines already written for it.
        self._written: dict[tuple[str, date], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def export(self) -> list[Path]:
        """Writes the files whose day got new lines; returns them."""
        written: list[Path] = []
        with self._lock:
            for name, sim in self.sims.items():
                # A copy, taken at once: the worker's loop may append lines meanwhile.
                lines = sim.settlement_lines()
                per_day: dict[date, int] = {}
                for line in lines:
                    per_day[line.day] = per_day.get(line.day, 0) + 1
                for day, count in sorted(per_day.items()):
                    if self._written.get((name, day)) == count:
                        continue
                    path = settlement_path(self.directory, name, day)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    tmp.write_text(settlement_csv(lines, day))
                    tmp.replace(path)
                    self._written[(name, day)] = count
                    written.append(path)
        return written

    def start(self) -> SettlementExporter:
        self._thread = threading.Thread(target=self._run, name="settlement-export", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.export()
            except OSError as e:
                log.error("settlement export to %s failed: %s", self.directory, e)

    def stop(self) -> None:
        """Stops the thread and writes what is new (also called at exit)."""
        self._stop.set()
        atexit.unregister(self.stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval_s + 5)
        try:
            self.export()
        except OSError as e:
            log.error("settlement export to %s failed: %s", self.directory, e)
