"""Embedded mode: one gateway process, zero external services.

The fast path's WAL is the event log; an in-process tailer materialises committed records into
SQLite; the payment worker runs in a child process (runtime/worker_process.py) and announces every
change it persists on the change bus. Between the acknowledgement of a payment and the tailer's
commit, `recent` keeps the payment readable (read-your-writes); the tailer forgets it once the
store has it, so `recent` never holds more than what the tailer has not applied yet (and at most
`RECENT_MAX`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gateway._fastpath import FastPath
from gateway.config import Config
from gateway.domain.records import created_payment_ids
from gateway.feed.tailer import Tailer
from gateway.runtime.base import CreateAnswer, Runtime, starting
from gateway.runtime.worker_process import WorkerProcess
from gateway.store.base import Merchant
from gateway.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from gateway.feed.eventlog import EventLog

log = logging.getLogger("gateway.runtime")

T = TypeVar("T")
RECENT_MAX = 1_000_000


class EmbeddedRuntime(Runtime):
    def __init__(self, config: Config, data_dir: Path) -> None:
        super().__init__(config, data_dir)
        self.store: SqliteStore | None = None
        self.tailer: Tailer | None = None
        self.worker: WorkerProcess | None = None
        # Payments acknowledged but not yet in the store: payment id -> (merchant id, body).
        self.recent: dict[str, tuple[str, bytes]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.store = SqliteStore(self.data_dir / "gateway.db")
        store.migrate()
        fastpath = self.fastpath = FastPath(self.config.fastpath_json(self.data_dir))
        self.tailer = Tailer(str(self.data_dir / "wal"), store, fastpath, self.config.tailer.batch_records_max,
                             on_applied=self._applied)
        caught_up = self.tailer.catch_up()
        self.tailer.start()
        # One process owns the store and its worker announces every change: no periodic re-read.
        self._start_common(loop, store, fastpath, recheck_s=None)
        assert self.changes is not None
        # Payments applied before the worker exists are found by its first scan.
        self.worker = WorkerProcess(str(store.path), loop)
        self.worker.on_change.append(self.changes.changed)
        self.worker.start()
        self.ready = True
        log.info("gateway ready: %d WAL records recovered (%d torn bytes cut), %d applied on start",
                 fastpath.recovered_records, fastpath.truncated_bytes, caught_up)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready = False
        if self.worker is not None:
            self.worker.stop()
        self._stop_fastpath()
        if self.tailer is not None:
            self.tailer.stop()
        if self.store is not None:
            self.store.close()
        log.info("gateway stopped; WAL flushed")

    def _applied(self, records: list[tuple[int, bytes]]) -> None:
        # Tailer thread. dict.pop is atomic under the GIL.
        ids = created_payment_ids(records)
        if self.worker is not None:
            self.worker.submit_payments(ids)
        for pid in ids:
            self.recent.pop(pid, None)

    def _remember(self, payment_id: str, body: bytes, merchant_id: str) -> None:
        if len(self.recent) < RECENT_MAX:
            self.recent[payment_id] = (merchant_id, body)

    def merchant_by_key_hash(self, digest: str) -> Merchant | None:
        return self.store.merchant_by_key_hash(digest) if self.store is not None else None

    async def create(self, merchant: Merchant, idem_key: str | None, body: bytes) -> CreateAnswer:
        if not self.ready or self.durability is None:
            return starting()
        remember: Callable[[str, bytes], None] = lambda pid, out: self._remember(pid, out, merchant.id)
        return await self.durability.accept(merchant, idem_key, body, remember=remember)

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
        return super().metrics_text() + (
            "# TYPE gateway_tailer_applied_lsn gauge\n"
            f"gateway_tailer_applied_lsn {self.tailer.applied_lsn if self.tailer else 0}\n"
        )
