"""Embedded mode's worker child process: WAL materialisation and the payment worker, off the HTTP process.

The materialisation of the WAL into SQLite (the tailer) and the worker are CPU-heavy Python (state
machine, SQLite transactions, simulated PSPs); in the HTTP process they would take the GIL from the
event loop and put their work into every merchant's latency. In their own process they use the second
core instead, and the HTTP process does only fast-path work. The two talk over the child's stdin and
stdout, one line per message:

    parent → child   L <lsn>                the WAL is committed up to here (after each group commit)
                     O <operation id>       an accepted capture, void or refund
    child → parent   R <lsn> <n>            start-up materialisation done: applied up to lsn, n records
                     A <lsn>                records up to lsn are in the store (read-your-writes ends)
                     C <payment id> ...     persisted changes (wake `Prefer: wait` requests), one
                                            line per round of the worker's event loop
                     B <n>                  the worker's backlog: payments and operations not finished
                     M <JSON string>        the worker's metrics as Prometheus text (every
                                            METRICS_REPORT_S), served on the gateway's /metrics

The child reads the WAL read-only (it never truncates or repairs it: the parent's fast path recovered
it before the child starts) and only up to the committed LSN the parent sent, so it never applies a
record that is not durable. The store's checkpoint advances with the rows, so a restarted child
resumes exactly where the last transaction ended. The child stops when its stdin closes, so it never
outlives the gateway; if it dies on its own, the parent starts a new one (`RESPAWN_DELAY_S`), which
resumes from the checkpoint. Anything lost in the pipe is found again by the worker's periodic scan.

Both sides load the same config file (its path is the child's second argument; default: the one
`gateway serve` put in GATEWAY_SETTINGS): with `[worker] enabled = false` the child only
materialises the WAL (payments stay `processing`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import msgspec

from gateway import config as config_mod
from gateway.domain.records import created_payments

log = logging.getLogger("gateway.worker")

STOP_WAIT_S = 15.0
# A child that materialises a long WAL at start-up may take this long before it is ready.
READY_WAIT_S = 600.0
RESPAWN_DELAY_S = 0.5
BACKLOG_REPORT_S = 0.2
# The worker's metrics reach the HTTP process this often: a scrape sees them at most this old.
METRICS_REPORT_S = 1.0
# A metrics line longer than this is dropped (and logged): the pipe is not for unbounded text.
METRICS_LINE_BYTES_MAX = 4 * 1024 * 1024


class WorkerProcess:
    """The parent's side: starts the child, feeds it, and hands what it reports to callbacks."""

    def __init__(self, db_path: str, loop: asyncio.AbstractEventLoop, *, config_path: str | None = None,
                 wal_dir: str | None = None) -> None:
        self.db_path = db_path
        self.loop = loop
        self.config_path = config_path if config_path is not None else served_config_path()
        # Set: the child materialises this WAL (embedded mode); None: it runs the worker only.
        self.wal_dir = wal_dir
        self.on_change: list[Callable[[str], None]] = []
        self.on_applied: list[Callable[[int], None]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.applied_lsn = 0
        self.backlog = 0
        self.respawns = 0
        # The child's metrics text (its last `M` line); empty until it reports.
        self.metrics_text = ""
        self._committed_lsn = 0
        self._sent_lsn = -1
        self._stopping = False
        self._send_lock = threading.Lock()
        self._buf = b""

    def start(self, committed_lsn: int = 0) -> int:
        """Starts the child and waits until it has materialised the WAL up to `committed_lsn`; returns
        how many records that applied (0 without a WAL)."""
        self._committed_lsn = committed_lsn
        worker_on = config_mod.load(self.config_path).worker.enabled
        if not worker_on:
            # Benchmarks of the request path alone; payments stay `processing`.
            log.warning("worker.enabled = false (or GATEWAY_WORKER=off): the payment worker is not started")
            if self.wal_dir is None:
                return 0
        return self._spawn(worker_on)

    def _spawn(self, worker_on: bool) -> int:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.runtime.worker_process", self.db_path, self.config_path or "",
             self.wal_dir or "", str(self._committed_lsn), "1" if worker_on else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "GATEWAY_LOG_LEVEL": logging.getLevelName(logging.getLogger().level).lower()},
        )
        assert self.proc.stdout is not None
        applied = self._wait_ready()
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.loop.add_reader(self.proc.stdout.fileno(), self._on_readable)
        self._sent_lsn = -1
        self.committed(self._committed_lsn)
        return applied

    def _wait_ready(self) -> int:
        """Reads up to the child's `R` line (blocking: start-up waits for it, as it waited for the
        tailer); what follows it in the same read stays in the buffer for `_on_readable`."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + READY_WAIT_S
        self._buf = b""
        while time.monotonic() < deadline:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the worker process exited during start-up (exit code {self.proc.wait()})")
            self._buf += chunk
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"R "):
                    lsn, count = line[2:].split()
                    self._handle(b"A " + lsn)  # what a new child applied at start is in the store too
                    return int(count)
                self._handle(line)
        raise RuntimeError(f"the worker process was not ready within {READY_WAIT_S} s")

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

    def committed(self, lsn: int) -> None:
        """The WAL is durable up to `lsn` (called after each group commit)."""
        self._committed_lsn = max(self._committed_lsn, lsn)
        if self.wal_dir is not None and self._committed_lsn != self._sent_lsn:
            self._sent_lsn = self._committed_lsn
            self._send(f"L {self._committed_lsn}")

    def submit_operation(self, operation_id: str) -> None:
        self._send(f"O {operation_id}")

    def _on_readable(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        try:
            chunk = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.loop.remove_reader(proc.stdout.fileno())
            if not self._stopping:
                self._respawn_later(proc)
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        kind, rest = line[:2], line[2:]
        if kind == b"C ":
            for pid in rest.decode().split():
                for cb in self.on_change:
                    cb(pid)
        elif kind == b"A ":
            self.applied_lsn = int(rest)
            for applied in self.on_applied:
                applied(self.applied_lsn)
        elif kind == b"B ":
            self.backlog = int(rest)
        elif kind == b"M ":
            self.metrics_text = msgspec.json.decode(rest, type=str)

    def _respawn_later(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.error("the worker process exited on its own (exit code %s); starting a new one in %s s", code,
                  RESPAWN_DELAY_S)
        self.respawns += 1
        self.loop.call_later(RESPAWN_DELAY_S, self._respawn)

    def _respawn(self) -> None:
        if self._stopping:
            return
        try:
            self._spawn(config_mod.load(self.config_path).worker.enabled)
        except (OSError, RuntimeError) as e:
            log.error("could not start the worker process again (%s); retrying", e)
            self.loop.call_later(RESPAWN_DELAY_S, self._respawn)

    def stop(self) -> None:
        """After the fast path is closed: the child applies what was committed, then exits."""
        self._stopping = True
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


class PipeCommitted:
    """The committed LSN as the parent reports it: the tailer's `CommittedSource` in the child."""

    def __init__(self, lsn: int) -> None:
        self._lsn = lsn
        self._cond = threading.Condition()

    def committed_lsn(self) -> int:
        return self._lsn

    def advance(self, lsn: int) -> None:
        with self._cond:
            if lsn > self._lsn:
                self._lsn = lsn
                self._cond.notify_all()

    def wait_committed(self, lsn: int, timeout_ms: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._lsn >= lsn, timeout_ms / 1000)


class _Out:
    """The child's stdout, shared by its threads."""

    def __init__(self) -> None:
        self.out = sys.stdout.buffer
        self.lock = threading.Lock()

    def write(self, line: bytes) -> None:
        with self.lock:
            try:
                self.out.write(line + b"\n")
                self.out.flush()
            except (BrokenPipeError, ValueError):
                pass


def _child_main(db_path: str, config_path: str | None, wal_dir: str | None, committed_lsn: int,
                worker_on: bool) -> int:
    from gateway import logs
    from gateway.feed.tailer import Tailer
    from gateway.processing.worker import Worker, WorkerSettings
    from gateway.store.sqlite import SqliteStore

    cfg = config_mod.load(config_path)
    logs.setup(os.environ.get("GATEWAY_LOG_LEVEL", "info"), cfg.log.format)
    store = SqliteStore(db_path, background_checkpoint=True)
    out = _Out()
    worker = Worker(store, WorkerSettings.from_config(cfg)) if worker_on else None
    source = PipeCommitted(committed_lsn)

    def applied(records: list[tuple[int, bytes]]) -> None:
        if worker is not None:
            worker.submit_payments(*created_payments(records))
        out.write(b"A %d" % records[-1][0])

    tailer = Tailer(wal_dir, store, source, cfg.tailer.batch_records_max) if wal_dir else None
    caught_up = tailer.catch_up() if tailer is not None else 0
    out.write(b"R %d %d" % (tailer.applied_lsn if tailer is not None else 0, caught_up))
    stopping = threading.Event()
    if worker is not None:
        worker.on_change.append(_ChangeLines(out).changed)
        worker.start()  # its start-up scan finds every payment still `processing`
        backlog = worker  # read by the reporter thread
        threading.Thread(target=_report_backlog, args=(lambda: backlog.backlog, out, stopping),
                         daemon=True).start()
        threading.Thread(target=_report_metrics, args=(worker.metrics.registry.render, out, stopping),
                         daemon=True).start()
    if tailer is not None:
        tailer.on_applied = applied
        tailer.start()
    try:
        for raw in sys.stdin.buffer:
            kind, _, rest = raw.decode().strip().partition(" ")
            if kind == "L" and rest.isdigit():
                source.advance(int(rest))
            elif kind == "O" and rest and worker is not None:
                worker.submit_operation(rest)
    finally:
        stopping.set()
        if tailer is not None:
            tailer.stop()  # a last catch-up: the store holds every committed record
        if worker is not None:
            worker.stop()
        store.close()
    return 0


class _ChangeLines:
    """The worker's changes as `C` lines: the ids changed in one round of its event loop go out as one
    line (a write per payment would cost more than the change), at most `IDS_PER_LINE_MAX` a line."""

    IDS_PER_LINE_MAX = 128

    def __init__(self, out: _Out) -> None:
        self.out = out
        self.pending: list[bytes] = []

    def changed(self, payment_id: str) -> None:
        # Called by the worker's coroutines: the flush runs once this round of its event loop is done.
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(payment_id.encode())

    def flush(self) -> None:
        ids, self.pending = self.pending, []
        for i in range(0, len(ids), self.IDS_PER_LINE_MAX):
            self.out.write(b"C " + b" ".join(ids[i:i + self.IDS_PER_LINE_MAX]))


def _report_metrics(render: Callable[[], str], out: _Out, stopping: threading.Event) -> None:
    """Renders the worker's metrics on this thread (a scrape never waits for the child) and sends them."""
    while not stopping.wait(METRICS_REPORT_S):
        try:
            line = b"M " + msgspec.json.encode(render())
        except RuntimeError:  # a dict resized while it was copied: the next round sends them
            continue
        if len(line) > METRICS_LINE_BYTES_MAX:
            log.error("worker metrics text is %d bytes, over %d: not sent", len(line), METRICS_LINE_BYTES_MAX)
            continue
        out.write(line)


def _report_backlog(backlog: Callable[[], int], out: _Out, stopping: threading.Event) -> None:
    last = -1
    while not stopping.wait(BACKLOG_REPORT_S):
        n = backlog()
        if n != last:
            out.write(b"B %d" % n)
            last = n


if __name__ == "__main__":
    args = [*sys.argv[1:], "", "", "0", "1"][:5]
    sys.exit(_child_main(args[0], args[1] or None, args[2] or None, int(args[3] or 0), args[4] != "0"))
