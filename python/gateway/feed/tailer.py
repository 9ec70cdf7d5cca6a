"""Embedded mode's event feed: a thread that materialises committed WAL records into the store.

The store's checkpoint advances in the same transaction as the rows, so after a crash the tailer
resumes exactly where the last transaction ended; records applied twice are ignored by id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from gateway._fastpath import WalReader
from gateway.store.base import Store

log = logging.getLogger("gateway.tailer")


class CommittedSource(Protocol):
    def committed_lsn(self) -> int: ...
    def wait_committed(self, lsn: int, timeout_ms: int) -> bool: ...


class Tailer:
    def __init__(
        self,
        wal_dir: str,
        store: Store,
        source: CommittedSource,
        batch_records_max: int = 1000,
        on_applied: Callable[[list[tuple[int, bytes]]], None] | None = None,
    ) -> None:
        self.store = store
        self.source = source
        self.batch_records_max = batch_records_max
        self.on_applied = on_applied
        self.reader = WalReader(wal_dir, store.checkpoint())
        self.applied_lsn = store.checkpoint()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def step(self) -> int:
        """Applies one batch of committed records; returns how many were read."""
        records = self.reader.read(self.source.committed_lsn(), self.batch_records_max)
        if records:
            self.store.apply_wal_records(records)
            self.applied_lsn = records[-1][0]
            if self.on_applied is not None:
                self.on_applied(records)
        return len(records)

    def catch_up(self) -> int:
        total = 0
        while (n := self.step()) > 0:
            total += n
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.step() == 0:
                    self.source.wait_committed(self.applied_lsn + 1, 50)
            except BaseException as e:
                self.error = e
                log.exception("tailer stopped")
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wal-tailer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread after a final catch-up so the store holds every committed record."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is None:
            self.catch_up()
