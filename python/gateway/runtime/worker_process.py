"""Runs the embedded-mode payment worker in a child process.

The worker is CPU-heavy Python (state machine, SQLite transactions, simulated PSPs); in the HTTP
process it would take the GIL from the event loop and put its work into every merchant's latency.
In its own process it uses the second core instead. The two talk over the child's stdin and stdout,
one line per message:

    parent → child   P <payment id> ...     new payments (from the tailer)
                     O <operation id>       an accepted capture, void or refund
    child → parent   C <payment id>         a persisted change (wakes `Prefer: wait` requests)

The child stops when its stdin closes, so it never outlives the gateway; it is in the gateway's
process group, so a SIGKILL of the group takes it too. Anything lost in the pipe is found again by
the worker's periodic scan of the store.

Both sides load the same config file (its path is the child's second argument; default: the one
`gateway serve` put in GATEWAY_SETTINGS): `[worker] enabled` decides whether a child starts, and the
child builds its `WorkerSettings` from `[worker]`, `[psp]`, `[router]` and `[webhooks]`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import msgspec

from gateway import config as config_mod

log = logging.getLogger("gateway.worker")

# Payment ids per line: keeps a line far below the pipe's atomic write size.
IDS_PER_LINE_MAX = 64
STOP_WAIT_S = 15.0


class WorkerProcess:
    """The interface of `Worker` (start, stop, submit_payments, submit_operation, on_change), with the
    worker itself in a child process."""

    def __init__(self, db_path: str, loop: asyncio.AbstractEventLoop, *, config_path: str | None = None) -> None:
        self.db_path = db_path
        self.loop = loop
        self.config_path = config_path if config_path is not None else served_config_path()
        self.on_change: list[Callable[[str], None]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._send_lock = threading.Lock()
        self._buf = b""

    def start(self) -> None:
        if not config_mod.load(self.config_path).worker.enabled:
            # Benchmarks of the request path alone; payments stay `processing`.
            log.warning("worker.enabled = false (or GATEWAY_WORKER=off): the payment worker is not started")
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.runtime.worker_process", self.db_path, self.config_path or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "GATEWAY_LOG_LEVEL": logging.getLevelName(logging.getLogger().level).lower()},
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.loop.add_reader(self.proc.stdout.fileno(), self._on_readable)

    def _send(self, line: str) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None:
            return
        with self._send_lock:
            try:
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                log.error("payment worker process is gone (exit code %s)", proc.poll())

    def submit_payments(self, payment_ids: list[str]) -> None:
        for i in range(0, len(payment_ids), IDS_PER_LINE_MAX):
            self._send("P " + " ".join(payment_ids[i : i + IDS_PER_LINE_MAX]))

    def submit_operation(self, operation_id: str) -> None:
        self._send(f"O {operation_id}")

    def _on_readable(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.loop.remove_reader(self.proc.stdout.fileno())
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.startswith(b"C "):
                pid = line[2:].decode()
                for cb in self.on_change:
                    cb(pid)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.stdout is not None:
            try:
                self.loop.remove_reader(proc.stdout.fileno())
            except (ValueError, RuntimeError):
                pass
        with self._send_lock:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("payment worker did not stop in %ss; killing it", STOP_WAIT_S)
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def served_config_path() -> str | None:
    """The config file of the running `gateway serve` (GATEWAY_SETTINGS), or None: the defaults."""
    raw = os.environ.get("GATEWAY_SETTINGS")
    if not raw:
        return None
    path = msgspec.json.decode(raw.encode(), type=dict[str, object]).get("config_path")
    return path if isinstance(path, str) and path else None


def _child_main(db_path: str, config_path: str | None) -> int:
    from gateway import logs
    from gateway.processing.worker import Worker, WorkerSettings
    from gateway.store.sqlite import SqliteStore

    logs.setup(os.environ.get("GATEWAY_LOG_LEVEL", "info"))
    settings = WorkerSettings.from_config(config_mod.load(config_path))
    store = SqliteStore(db_path)
    worker = Worker(store, settings)
    out = sys.stdout.buffer
    out_lock = threading.Lock()

    def changed(pid: str) -> None:
        with out_lock:
            try:
                out.write(b"C " + pid.encode() + b"\n")
                out.flush()
            except (BrokenPipeError, ValueError):
                pass

    worker.on_change.append(changed)
    worker.start()
    try:
        for raw in sys.stdin.buffer:
            kind, _, rest = raw.decode().strip().partition(" ")
            if kind == "P":
                worker.submit_payments(rest.split())
            elif kind == "O" and rest:
                worker.submit_operation(rest)
    finally:
        worker.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None))
