"""Embedded mode: one gateway, zero external services.

The fast path's WAL is the event log. The HTTP process does only fast-path work: a child process
(runtime/worker_process.py) materialises the committed records into SQLite (told the committed LSN
after each group commit) and runs the payment worker, announcing every change it persists on the
change bus. Between the acknowledgement of a payment and the child's commit of its record, `recent`
keeps the payment readable (read-your-writes); the child reports the LSN it has applied and every
payment at or below it is forgotten, so `recent` holds only what is not in the store yet (and at most
`RECENT_MAX`). The backlog (acknowledged and not yet finished by the worker) is bounded by
`[worker] backlog_max`: at the bound a create answers `503 backlog_full` with `Retry-After`, and
nothing is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gateway._fastpath import FastPath
from gateway.config import Config
from gateway.runtime.base import CreateAnswer, Runtime, starting, unavailable
from gateway.runtime.worker_process import WorkerProcess
from gateway.store.base import Merchant
from gateway.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from gateway.feed.eventlog import EventLog

log = logging.getLogger("gateway.runtime")

T = TypeVar("T")
RECENT_MAX = 1_000_000
# The child is told the committed LSN at most once per this interval (the first commit after a quiet
# interval at once, later ones together at its end). Telling it after every group commit (a pipe write
# each, 1,000+ a second) woke the child every time, and on a shared core the woken child took the core
# from the event loop in the middle of its commit callback: a third of the loop's time under load.
COMMITTED_NOTIFY_INTERVAL_S = 0.002


class CommittedNotifier:
    """Hands the committed LSN to `send` at most once per `interval_s`, never dropping the latest."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[int], None],
                 interval_s: float = COMMITTED_NOTIFY_INTERVAL_S) -> None:
        self.loop = loop
        self.send = send
        self.interval_s = interval_s
        self.lsn = 0
        self._sent_at = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, lsn: int) -> None:
        self.lsn = max(self.lsn, lsn)
        if self._timer is not None:
            return  # the pending send takes this LSN with it
        now = self.loop.time()
        if now - self._sent_at >= self.interval_s:
            self._sent_at = now
            self.send(self.lsn)
        else:
            self._timer = self.loop.call_at(self._sent_at + self.interval_s, self.flush)

    def flush(self) -> None:
        """Sends the latest LSN now (also before the child is stopped, so that it applies all of it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sent_at = self.loop.time()
        self.send(self.lsn)


class EmbeddedRuntime(Runtime):
    def __init__(self, config: Config, data_dir: Path) -> None:
        super().__init__(config, data_dir)
        self.store: SqliteStore | None = None
        self.worker: WorkerProcess | None = None
        self.notifier: CommittedNotifier | None = None
        # Payments acknowledged but not yet in the store: payment id -> (merchant id, body), and their
        # (lsn, id) in LSN order (the fast path gives LSNs out in the order of the calls).
        self.recent: dict[str, tuple[str, bytes]] = {}
        self._recent_order: deque[tuple[int, str]] = deque()
        self.backlog_refused = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.store = SqliteStore(self.data_dir / "gateway.db")
        store.migrate()
        # Recovery rebuilds the idempotency table only from what the store does not hold yet; the
        # store's record of every key answers for the rest (docs/idempotency.md).
        fastpath = self.fastpath = FastPath(
            self.config.fastpath_json(self.data_dir, recover_after_lsn=store.checkpoint(), key_filter=True))
        if fastpath.filter_cold:
            log.warning("idempotency key filter lost and its WAL already removed: every keyed create that"
                        " the memory table misses reads the store until [idempotency] ttl_s has passed")
        # One process owns the store and its worker announces every change: no periodic re-read.
        self._start_common(loop, store, fastpath, recheck_s=None)
        assert self.changes is not None and self.durability is not None
        worker = self.worker = WorkerProcess(str(store.path), loop, wal_dir=str(self.data_dir / "wal"))
        worker.on_change.append(self.changes.changed)
        worker.on_applied.append(self._applied)
        self.notifier = CommittedNotifier(loop, worker.committed)
        self.durability.on_committed.append(self.notifier)
        self.durability.durable_lookup = store.idempotency_record
        caught_up = worker.start(fastpath.committed_lsn())  # materialises what the WAL holds first
        fastpath.set_materialised_lsn(store.checkpoint())
        self.ready = True
        log.info("gateway ready: %d WAL records recovered (%d torn bytes cut), %d applied on start",
                 fastpath.recovered_records, fastpath.truncated_bytes, caught_up)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready = False
        self._stop_fastpath()  # the last group commit reaches the child, which applies it, then stops
        if self.notifier is not None:
            self.notifier.flush()
        if self.worker is not None:
            self.worker.stop()
        if self.store is not None:
            self.store.close()
        log.info("gateway stopped; WAL flushed")

    def _applied(self, lsn: int) -> None:
        """The child has stored every record up to `lsn`: those payments are read from the store now."""
        if self.fastpath is not None:
            self.fastpath.set_materialised_lsn(lsn)
        order = self._recent_order
        while order and order[0][0] <= lsn:
            self.recent.pop(order.popleft()[1], None)

    def _remember(self, merchant_id: str, payment_id: str, body: bytes, lsn: int) -> None:
        if len(self.recent) < RECENT_MAX:
            self.recent[payment_id] = (merchant_id, body)
            self._recent_order.append((lsn, payment_id))

    def backlog(self) -> int:
        """Acknowledged payments not yet finished: not yet stored, or queued and in progress in the worker."""
        return len(self.recent) + (self.worker.backlog if self.worker is not None else 0)

    def merchant_by_key_hash(self, digest: str) -> Merchant | None:
        return self.store.merchant_by_key_hash(digest) if self.store is not None else None

    async def create(self, merchant: Merchant, idem_key: str | None, body: bytes) -> CreateAnswer:
        if not self.ready or self.durability is None:
            return starting()
        if self.backlog() >= self.config.worker.backlog_max:
            self.backlog_refused += 1
            return unavailable("backlog_full", "The gateway has more accepted payments in progress than its"
                               " [worker] backlog_max; nothing was created. Retry with the same Idempotency-Key.")
        return await self.durability.accept(merchant, idem_key, body, remember=self._remember)

    async def read_payment(self, merchant_id: str, payment_id: str, fresh: bool = False) -> bytes | None:
        hit = self.recent.get(payment_id)
        if hit is not None and hit[0] == merchant_id:
            return hit[1]
        return self.store.get_payment(merchant_id, payment_id) if self.store is not None else None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        # SQLite is local and sub-millisecond: inline on the event loop.
        return fn(*args)

    def submit_operation(self, operation_id: str) -> None:
        if self.worker is not None:
            self.worker.submit_operation(operation_id)

    def event_log(self) -> tuple[EventLog, str]:
        from gateway.feed.eventlog import WalEventLog

        assert self.fastpath is not None
        return WalEventLog(str(self.data_dir / "wal"), self.fastpath.committed_lsn()), "wal"

    def metrics_text(self) -> str:
        worker = self.worker
        committed = self.fastpath.committed_lsn() if self.fastpath is not None else 0
        return super().metrics_text() + (
            "# HELP gateway_tailer_applied_lsn Highest WAL LSN the worker child has applied to the store.\n"
            "# TYPE gateway_tailer_applied_lsn gauge\n"
            f"gateway_tailer_applied_lsn {worker.applied_lsn if worker else 0}\n"
            "# HELP gateway_backlog_payments Acknowledged payments not finished yet (bound: [worker] backlog_max).\n"
            "# TYPE gateway_backlog_payments gauge\n"
            f"gateway_backlog_payments {self.backlog()}\n"
            "# HELP gateway_backlog_refused_total Creates refused with 503 backlog_full.\n"
            "# TYPE gateway_backlog_refused_total counter\n"
            f"gateway_backlog_refused_total {self.backlog_refused}\n"
            "# HELP gateway_worker_respawns_total Times the worker child was started again after it died.\n"
            "# TYPE gateway_worker_respawns_total counter\n"
            f"gateway_worker_respawns_total {worker.respawns if worker else 0}\n"
            "# HELP gateway_feed_lag_lsn WAL records committed but not yet applied to the store by the tailer.\n"
            "# TYPE gateway_feed_lag_lsn gauge\n"
            f"gateway_feed_lag_lsn {max(0, committed - (worker.applied_lsn if worker else 0))}\n"
        ) + (worker.metrics_text if worker is not None else "")
