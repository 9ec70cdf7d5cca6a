"""A watchdog of a process's main loop (the cluster `gateway worker`): the loop calls `beat()` at every
iteration; a thread of its own watches the time since the last beat.

- No beat for `stall_s`: the loop is stalled. `/readyz` says so (503) and `gateway_worker_stalled` is 1,
  so an operator, a load balancer or an alert sees it while it lasts.
- No beat for `2 * stall_s`: the process exits with `EXIT_STALLED`, for its supervisor (systemd,
  deploy/systemd/) to start it again. A worker holds nothing that an exit loses: its consumer offsets
  are committed only after PostgreSQL has the batch, so a new worker reads again what was in hand.
- After a stop was asked for (SIGTERM), the process exits with `EXIT_STOP_TIMEOUT` if it has not
  finished within `stop_s`, whatever the loop is blocked in: SIGTERM always stops the worker in a bound.

`os._exit` is the only exit a thread can force while the main thread is blocked in a C call.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("gateway.watchdog")

EXIT_STALLED = 70
EXIT_STOP_TIMEOUT = 75
CHECK_INTERVAL_S = 0.25


class LoopWatchdog:
    def __init__(self, stall_s: float, stop_s: float, stopping: threading.Event) -> None:
        if not (stall_s > 0 and stop_s > 0):
            raise ValueError(f"the watchdog's bounds must be positive (stall {stall_s} s, stop {stop_s} s)")
        self.stall_s = stall_s
        self.stop_s = stop_s
        self.stopping = stopping
        self.stalls = 0
        self.stalled = False
        self._last_beat = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-watchdog", daemon=True)

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def since_beat_s(self) -> float:
        return max(0.0, time.monotonic() - self._last_beat)

    def start(self) -> LoopWatchdog:
        self._thread.start()
        return self

    def done(self) -> None:
        """The process is about to return from its main function: nothing left to watch."""
        self._done.set()

    def _run(self) -> None:
        stop_asked_at: float | None = None
        while not self._done.wait(CHECK_INTERVAL_S):
            now = time.monotonic()
            if self.stopping.is_set():
                stop_asked_at = now if stop_asked_at is None else stop_asked_at
                if now - stop_asked_at > self.stop_s:
                    log.error("still not stopped %.1f s after the stop signal; exiting with %d",
                              now - stop_asked_at, EXIT_STOP_TIMEOUT)
                    os._exit(EXIT_STOP_TIMEOUT)
                continue  # the stop path has its own bound; no stall exit during it
            age = now - self._last_beat
            if age > self.stall_s and not self.stalled:
                self.stalled = True
                self.stalls += 1
                log.error("main loop stalled: no progress for %.1f s (exits at %.1f s)", age, 2 * self.stall_s)
            elif age <= self.stall_s and self.stalled:
                self.stalled = False
                log.warning("main loop progressing again")
            if age > 2 * self.stall_s:
                log.error("main loop stalled for %.1f s; exiting with %d for the supervisor to restart",
                          age, EXIT_STALLED)
                os._exit(EXIT_STALLED)
