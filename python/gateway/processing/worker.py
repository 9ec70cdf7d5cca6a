"""Embedded mode's payment worker: takes accepted payments to a PSP and back.

One thread with its own asyncio event loop, so PSP latency (50-300 ms per call) never touches the
HTTP loop. It is fed three ways:

- the tailer hands it every new `payment.created` record (runtime/embedded.py);
- the merchant API hands it every accepted capture/void/refund and resumed challenge (`submit_operation`);
- on start, and then every `reconcile_interval_ms`, a scan finds payments still `processing`
  (a crash between acceptance and processing), `pending_verification` payments and open operations
  (timeouts, or a crash in the middle of a PSP call) and resolves them by status query or by replaying
  the same PSP idempotency key.

Merchant operations are *accepted* by the API (intent recorded, 202) and executed here (`Prefer: wait=MS`
waits for the answer). Work on one payment is serialised by a per-payment lock, and the store's
version check refuses any write computed from a stale state.

In cluster mode several workers (`gateway worker`, runtime/cluster_worker.py) share one PostgreSQL
store (`shared=True`): each payment is driven by one of them at a time through the store's claim (a
session advisory lock; `claim` fails while another worker holds it, and the server releases it if
that worker dies), the periodic scan also takes over payments left `processing` for longer than
`SHARED_PROCESSING_STALE_S` (a worker killed in the middle), and operation idempotency keys are only
finished once they are older than any request can wait.

Every PSP call of a payment uses a key derived from the payment id (`P:auth:n`, `P:capture:k`, ...),
recorded in `payment_attempts` *before* the call; after a crash the same key is resolved or replayed,
never replaced by a new one, so a PSP never charges twice.

New payments are taken through authorization and auto-capture a batch at a time
(processing/batch.py); what needs more than one attempt, and every operation, one payment at a time.
A payment left unfinished (a call that raised, a PSP unreachable) makes the next scan take up every
`processing` one. Settings: `WorkerSettings`, from `[worker]`, `[psp]`, `[router]`, `[webhooks]`.
Cluster workers must share one PSP, as in production (a payment authorized through one worker may be
captured through another): run `gateway psp-sim` once and point every worker at it with `psp.url`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gateway import config as config_mod
from gateway.psp_sim.export import SettlementExporter

if TYPE_CHECKING:
    from gateway.processing.webhooks import Dispatcher

from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, ProcessingResult
from gateway.processing.authorize import process_authorization
from gateway.processing.batch import UNRESOLVED, authorization_change, now_ms, operation_change, settle_batch
from gateway.processing.batching import Batcher
from gateway.processing.metrics import PipelineMetrics, refresh_loop
from gateway.processing.operations import OperationOptions, process_capture, process_refund, process_void
from gateway.processing.resolve import resolve_pending
from gateway.processing.settings import WorkerSettings, build_psps, tune_gc
from gateway.store.payments import Applied, Change, Intent
from gateway.store.processing import Operation, PaymentRecord, StaleVersion

log = logging.getLogger("gateway.worker")

T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")

WORKER_QUEUE_MAX = 100_000
RECONCILE_BATCH_MAX = 1000
STOP_WAIT_S = 5.0
# Shared store: a payment still `processing` this long after its creation is taken over by any worker
# (its own worker died, or its queue overflowed); a live owner keeps it through its claim.
SHARED_PROCESSING_STALE_S = 2
# Shared store: an operation's Idempotency-Key still in flight after this long belongs to a gateway
# process that died (requests wait at most 10 s, operations.PREFER_WAIT_MS_MAX).
SHARED_KEY_ABANDONED_MS = 60_000


class Worker:
    def __init__(self, store: object, settings: WorkerSettings | None = None, *, shared: bool = False) -> None:
        from gateway.store.postgres import PostgresStore
        from gateway.store.processing import ProcessingStore
        from gateway.store.sqlite import SqliteStore

        assert isinstance(store, SqliteStore | PostgresStore)
        # No settings given: the defaults with the environment's overrides (config.ENV_OVERRIDES).
        self.settings = settings or WorkerSettings.from_config(config_mod.load(None))
        self.pstore = ProcessingStore(store)
        # Other workers write the same store (cluster mode): claims, stale-payment takeover, and store
        # calls on threads (one per pooled connection).
        self.shared = shared
        pool_max = getattr(store, "pool_max", 0)
        self._executor = (
            ThreadPoolExecutor(max(1, pool_max), thread_name_prefix="worker-db") if shared and pool_max else None
        )
        s = self.settings
        # The async path's metrics (processing/metrics.py): counters here, live state read when rendered.
        self.metrics = PipelineMetrics()
        psps = build_psps(s, observer=self.metrics)
        self.sims, self.clients, self.bulkheads = psps.sims, psps.clients, psps.bulkheads
        self.router, self.policy = psps.router, psps.policy
        self.metrics.bind(self.router, self.bulkheads, lambda: self.backlog)
        # Acknowledgement time (ms) of the payments handed over by the feed, until they leave processing.
        self._accepted_ms: dict[str, int] = {}
        # Embedded mode's in-process simulators write their daily settlement files beside the database,
        # for `gateway reconcile settlement` (docs/reconciliation.md).
        self.settlement_dir = (
            Path(store.path).parent / "settlements" if isinstance(store, SqliteStore) and self.sims else None
        )
        self.settlements: SettlementExporter | None = None
        # Group commit of the store calls of concurrently processed payments (processing/batching.py):
        # each batcher makes one `*_many` store call (one statement or transaction) for a whole batch.
        ps = self.pstore
        self.loads: Batcher[str, PaymentRecord | None] = self._store_batcher(ps.load_many, "load")
        self.intents: Batcher[Intent, None] = self._store_batcher(self._record_intents, "intent")
        self.applies: Batcher[Change, Applied] = self._store_batcher(lambda cs: self.pstore.apply_many(cs), "apply")
        self.attempt_reads: Batcher[tuple[str, str | None], list[AttemptRow]] = self._store_batcher(
            ps.attempts_many, "attempts")
        self.operation_reads: Batcher[str, Operation | None] = self._store_batcher(ps.operations_many, "operations")
        # Claims only mean something where other workers share the store; one statement per batch there.
        self.claims: Batcher[str, bool] = self._store_batcher(ps.claim_many, "claim")
        self.releases: Batcher[str, None] = self._store_batcher(ps.release_many, "release")
        # Called on the worker thread with a payment id after every persisted change to it.
        self.on_change: list[Callable[[str], None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._queue: asyncio.Queue[tuple[str, str]] | None = None
        self._queued: set[tuple[str, str]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None
        self._rescan = False
        self.webhooks: Dispatcher | None = None
        self.settled = 0
        self.errors = 0

    @property
    def backlog(self) -> int:
        """Payments and operations queued or in progress (read from other threads: a len is atomic)."""
        return len(self._queued)

    # -- lifecycle (called from other threads) ----------------------------------------------------

    def start(self) -> None:
        tune_gc()
        if self.settlement_dir is not None and self.sims:
            self.settlements = SettlementExporter(self.sims, self.settlement_dir).start()
        self._thread = threading.Thread(target=self._run, name="payment-worker", daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def stop(self) -> None:
        loop, stopping = self.loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S + 5)
        if self.settlements is not None:
            self.settlements.stop()  # writes what the last operations settled

    def submit_payments(self, payment_ids: list[str], accepted_ms: list[int] | None = None) -> None:
        """Thread-safe: queue new payments for authorization; `accepted_ms`: when each was acknowledged
        (the time to a final status is measured from it)."""
        loop = self.loop
        if loop is None or not payment_ids:
            return
        loop.call_soon_threadsafe(self._enqueue_many, [("payment", pid) for pid in payment_ids], accepted_ms)

    def submit_operation(self, operation_id: str) -> None:
        kind = "payment" if operation_id[:4] == "pay_" else "operation"  # (a payment: resumed after 3-D Secure)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._enqueue_many, [(kind, operation_id)])

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._queue = asyncio.Queue(WORKER_QUEUE_MAX)
        self._stopping = asyncio.Event()
        self._finish_abandoned_keys()
        self._scan(include_processing=True)
        from gateway.processing.webhooks import Dispatcher

        # Webhooks of the events this worker's changes wrote (and of any other worker's, in cluster mode).
        self.webhooks = Dispatcher(self.pstore, self.settings.webhooks, db=self._db, outcomes=self.metrics.webhooks)
        self._ready.set()
        dispatcher = asyncio.ensure_future(self._dispatch())
        reconciler = asyncio.ensure_future(self._reconcile_loop())
        webhooks = asyncio.ensure_future(self.webhooks.run())
        s = self.settings
        health = asyncio.ensure_future(refresh_loop(self.metrics, self._db, self.pstore, s.metrics_check_interval_ms,
                                                    s.ledger_check_interval_ms))
        await self._stopping.wait()
        for task in (dispatcher, reconciler, webhooks, health):
            task.cancel()
        if self._tasks:
            # In-flight PSP calls get a moment to finish; anything cut short left a `started` attempt
            # that the next start resolves by its key.
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(dispatcher, reconciler, webhooks, health, return_exceptions=True)
        await asyncio.gather(*(b.inner.aclose() for b in self.bulkheads.values()))  # HTTP connections of this loop
        self.pstore.close()  # drops this worker's claims at once instead of at process exit
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _enqueue_many(self, items: list[tuple[str, str]], accepted_ms: list[int] | None = None) -> None:
        assert self._queue is not None
        for i, item in enumerate(items):
            if item in self._queued:
                continue
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                # Bounded queue: what does not fit is found again by the reconciler's scan.
                self._rescan = True
                return
            self._queued.add(item)
            if accepted_ms is not None:
                self._accepted_ms[item[1]] = accepted_ms[i]

    def _finish_abandoned_keys(self) -> None:
        before = now_ms() - SHARED_KEY_ABANDONED_MS if self.shared else None
        abandoned = self.pstore.finish_abandoned_keys(before)
        if abandoned:
            log.info("%d operation idempotency keys left in flight by a stopped gateway now replay 202", abandoned)

    def _scan(self, include_processing: bool) -> None:
        items: list[tuple[str, str]] = []
        if include_processing:
            # All of them (up to the queue bound): after a crash every accepted payment must be found.
            items += [("payment", pid) for pid in self.pstore.payment_ids_with_status("processing", WORKER_QUEUE_MAX)]
        elif self.shared:
            # Another worker's payments, if it died in the middle (or ours that the queue dropped).
            stale = int(time.time()) - SHARED_PROCESSING_STALE_S
            items += [("payment", pid)
                      for pid in self.pstore.payment_ids_with_status("processing", RECONCILE_BATCH_MAX, stale)]
        items += [
            ("payment", pid)
            for pid in self.pstore.payment_ids_with_status("pending_verification", RECONCILE_BATCH_MAX)
        ]
        items += [("operation", op.id) for op in self.pstore.open_operations(RECONCILE_BATCH_MAX)]
        self._enqueue_many(items)

    async def _reconcile_loop(self) -> None:
        interval_s = self.settings.reconcile_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                rescan, self._rescan = self._rescan, False
                self._scan(include_processing=rescan)
                if self.shared:
                    self._finish_abandoned_keys()
            except Exception:
                log.exception("reconciler scan failed")

    async def _dispatch(self) -> None:
        """New payments go to the batch step (processing/batch.py) as many as are queued (up to
        `batch_records_max` and half of `inflight_max`: batches overlap); operations one by one."""
        assert self._queue is not None
        sem = asyncio.Semaphore(self.settings.inflight_max)
        per_batch = min(self.settings.batch_records_max, max(1, self.settings.inflight_max // 2))

        def finished(item: tuple[str, str]) -> None:
            self._queued.discard(item)
            self._accepted_ms.pop(item[1], None)
            sem.release()

        while True:
            await sem.acquire()  # a permit per item, taken before the item: nothing waits while held
            items = [await self._queue.get()]
            while len(items) < per_batch and not self._queue.empty() and not sem.locked():
                await sem.acquire()
                items.append(self._queue.get_nowait())
            new = [ident for kind, ident in items if kind == "payment"]
            for item in (i for i in items if i[0] != "payment"):
                task = asyncio.ensure_future(self._handle(item))
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._one_done, finished, item))
            if new:
                task = asyncio.ensure_future(settle_batch(self, new, lambda pid: finished(("payment", pid))))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _one_done(self, finished: Callable[[tuple[str, str]], None], item: tuple[str, str],
                  task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        finished(item)

    async def _handle(self, item: tuple[str, str]) -> None:
        kind, ident = item
        try:
            if kind == "payment":
                await self.process_payment(ident)
            else:
                await self.process_operation(ident)
        except Exception:
            self.failed()
            log.exception("processing %s %s failed; the reconciler will retry it", kind, ident)

    def failed(self) -> None:  # a payment was left unfinished: the next scan takes it up
        self.errors, self._rescan = self.errors + 1, True
        self.metrics.worker_errors.inc()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call. SQLite: inline (local, sub-millisecond). Shared PostgreSQL: on a thread of
        the pool, so that the commits of concurrent payments overlap (and share the server's WAL
        flushes) instead of queueing one after another on this event loop."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def _store_batcher(self, many: Callable[[list[In]], Sequence[Out]], name: str) -> Batcher[In, Out]:
        async def run(items: list[In]) -> list[Out]:
            return list(await self._db(many, items))

        s = self.settings
        return Batcher(run, s.batch_records_max, s.batch_linger_ms / 1000, name)

    def _record_intents(self, intents: list[Intent]) -> list[None]:
        self.pstore.record_intents(intents)
        return [None] * len(intents)

    async def _apply(self, change: Change) -> Applied:
        """One outcome, committed with the others of its batch; StaleVersion if the payment changed."""
        applied = await self.applies.submit(change)
        if not applied.applied:
            raise StaleVersion(f"payment {applied.payment_id} changed since version {change.base_version}")
        return applied

    async def _claim(self, payment_id: str) -> bool:
        return await self.claims.submit(payment_id) if self.shared else True

    async def _release(self, payment_id: str) -> None:
        if self.shared:
            await self.releases.submit(payment_id)

    def _lock(self, payment_id: str) -> asyncio.Lock:
        lock = self._locks.get(payment_id)
        return lock if lock is not None else self._locks.setdefault(payment_id, asyncio.Lock())

    def _changed(self, payment_id: str) -> None:
        if self.webhooks is not None and self.pstore.new_deliveries:
            self.pstore.new_deliveries = False
            self.webhooks.wake()  # the change wrote an event with deliveries: send them now
        for cb in self.on_change:
            cb(payment_id)

    # -- authorization ---------------------------------------------------------------------------

    async def process_payment(self, payment_id: str) -> None:
        await self._holding(payment_id, self._process_payment(payment_id))

    async def _holding(self, payment_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Runs `work` under the payment's lock and claim (another worker may drive it now: then not;
        the scan comes back if it is left unfinished)."""
        lock = self._lock(payment_id)
        async with lock:
            try:
                if not await self._claim(payment_id):
                    work.close()
                    return
                try:
                    await work
                finally:
                    await self._release(payment_id)
            finally:
                if not lock._waiters:
                    self._locks.pop(payment_id, None)

    async def _process_payment(self, payment_id: str) -> None:
        rec = await self.loads.submit(payment_id)
        if rec is None:
            return
        p = rec.payment
        if p.status not in (sm.PaymentStatus.PROCESSING, sm.PaymentStatus.PENDING_VERIFICATION):
            return
        unresolved = [
            a for a in await self.attempt_reads.submit((payment_id, None))
            if a.operation == "authorize" and a.status in UNRESOLVED
        ]
        if unresolved:
            # A timeout, or a crash in the middle of a call: ask the PSP about that very key.
            attempt = unresolved[-1]
            client = self.clients.get(attempt.psp)
            if client is None:
                log.error("payment %s: attempt %s went to %s, which is not configured", p.id, attempt.attempt_id,
                          attempt.psp)
                return
            if (result := await resolve_pending(p, attempt, client, now_ms)).outcome is None:
                self._rescan = True  # PSP unreachable: the next scan asks again
                return
        elif p.status is sm.PaymentStatus.PROCESSING:

            async def intent(row: AttemptRow) -> None:
                await self.intents.submit(Intent(row))

            result = await process_authorization(
                p, self.router, self.clients, now_ms, token=rec.token, policy=self.policy, record_intent=intent
            )
        else:
            log.error("payment %s is pending_verification without an unresolved attempt", p.id)
            return
        applied = await self._apply(authorization_change(rec, result))
        self.authorization_applied(result)
        if applied.operation is not None:
            # The auto-capture, in the same round: the operation and the payment are what this apply
            # just wrote under this worker's claim, with the `started` row of the capture's first
            # attempt, so nothing needs reading back and its intent is already committed.
            recorded = applied.intent.attempt_id if applied.intent is not None else None
            await self._drive_operation(applied.operation, result.transitions[-1].payment, [], recorded)

    # -- capture, void, refund -------------------------------------------------------------------

    async def process_operation(self, operation_id: str) -> None:
        op = await self.operation_reads.submit(operation_id)
        if op is not None:
            await self._holding(op.payment_id, self._process_operation(operation_id))

    async def _process_operation(self, operation_id: str) -> None:
        op = await self.operation_reads.submit(operation_id)
        if op is None or op.status not in ("pending", "pending_verification"):
            return
        rec = await self.loads.submit(op.payment_id)
        assert rec is not None
        unresolved = [a for a in await self.attempt_reads.submit((rec.payment.id, op.id)) if a.status in UNRESOLVED]
        await self._drive_operation(op, rec.payment, unresolved)

    async def _drive_operation(self, op: Operation, p: sm.Payment, unresolved: list[AttemptRow],
                               recorded: str | None = None) -> None:
        """Takes one open operation of `p` (held under this worker's claim) one step: resolves its
        unresolved attempt, or makes its PSP call, and applies the outcome. `recorded`: the attempt
        whose intent is already committed (not written again)."""
        from gateway.store.processing import OperationFinish

        client = self.clients.get(p.psp or "")
        if client is None:
            await self._db(self.pstore.finish_operation, OperationFinish(op.id, "failed", "psp_not_configured"), p.id)
            self.metrics.operations.inc((op.kind, "failed"))
            self._changed(p.id)
            return
        if unresolved:
            result = await resolve_pending(p, unresolved[-1], client, now_ms)
            if result.outcome is None:
                if op.status == "pending":
                    await self._db(self.pstore.finish_operation, OperationFinish(op.id, "pending_verification"), p.id)
                    self._changed(p.id)
                return
        else:

            async def intent(row: AttemptRow) -> None:
                await self.intents.submit(Intent(row, op.id))

            options = OperationOptions(record_intent=intent, actor=op.actor, policy=self.policy, recorded=recorded)
            key = op.psp_idempotency_key
            try:
                if op.kind == "capture":
                    result = await process_capture(p, client, now_ms, amount=op.amount, final_capture=op.final_capture,
                                                   idempotency_key=key, **options)
                elif op.kind == "void":
                    result = await process_void(p, client, now_ms, idempotency_key=key, **options)
                else:
                    result = await process_refund(p, client, now_ms, amount=op.amount, idempotency_key=key, **options)
            except sm.TransitionError as e:
                await self._db(self.pstore.finish_operation, OperationFinish(op.id, "failed", e.code), p.id)
                self.metrics.operations.inc((op.kind, "failed"))
                self._changed(p.id)
                return
        change = operation_change(op, p, result)
        await self._apply(change)
        self.operation_applied(op, change)

    def authorization_applied(self, result: ProcessingResult) -> None:
        """The counters and the change announcement of an applied authorization outcome."""
        p = result.payment
        if p.status is not sm.PaymentStatus.PENDING_VERIFICATION:
            self.settled += 1
            self.metrics.payment_final(p.status.value, p.failure_code, self._accepted_ms.pop(p.id, None))
        else:
            self.metrics.pending_verification_total.inc()
        self._changed(p.id)

    def operation_applied(self, op: Operation, change: Change) -> None:
        assert change.finish is not None
        self.metrics.operations.inc((op.kind, change.finish.status))
        self._changed(op.payment_id)
