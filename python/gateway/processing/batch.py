"""The worker's batch step: new payments taken through authorization and auto-capture together.

The common case of the async path is a payment just accepted, never sent to a PSP: the dispatcher
hands every such payment it finds queued (up to `[worker] batch_records_max` at once) to
`settle_batch`, which takes them through each stage together instead of a coroutine per payment:

1. hold: each payment's lock (and, sharing the store, its claim: one statement for the batch);
2. read: the payments' rows and attempts (one statement each);
3. intents: the `started` row of every first authorization attempt, in ONE transaction, committed
   before any call goes out (intent first, as on the one-payment path);
4. calls: every authorization call of the batch in flight at once (the PSPs' bulkheads bound each);
5. apply: the outcomes that have arrived, in ONE transaction per wave (`apply_many`), each with its
   auto-capture's operation and the `started` row of that capture's first attempt;
6. captures: those calls in flight, and their outcomes applied in one transaction per wave.

A wave's outcomes go through the worker's group commit (`Worker.applies`), which holds a round open
for `wave_linger_ms`: the waves of concurrent steps (at real PSP latency many small batches are in
flight at once) share one transaction instead of taking one each.

A wave is what has arrived when the step looks (at PSP time scale 0, the whole batch at once); a
payment whose call needs another attempt (a retry, a failover) or anything but a fresh
authorization (an unresolved attempt, pending verification, a capture the state machine refuses)
leaves the batch for the one-payment path of processing/worker.py, keeping its lock and claim, so the
rules for retries, timeouts and resolution are those of `AuthorizationRun` and `OperationRun` either
way. `finished(payment_id)` is called once per payment when the step is done with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, AttemptStatus, Outcome, ProcessingResult
from gateway.processing.authorize import AuthorizationRun, drive_authorization
from gateway.processing.batching import Batcher
from gateway.processing.metrics import PipelineMetrics
from gateway.processing.operations import OperationRun, drive_operation
from gateway.processing.settings import WorkerSettings
from gateway.psp.client import PSPClient, PSPResult
from gateway.psp.routing import RetryPolicy, Router
from gateway.store.payments import Applied, Change, Intent
from gateway.store.processing import Operation, OperationFinish, PaymentRecord, ProcessingStore

T = TypeVar("T")

log = logging.getLogger("gateway.worker")

UNRESOLVED = (AttemptStatus.STARTED, AttemptStatus.TIMEOUT)


def now_ms() -> int:
    return int(time.time() * 1000)


def authorization_change(rec: PaymentRecord, result: ProcessingResult) -> Change:
    """The change that persists an authorization's outcome, opening the auto-capture if it is one."""
    follow_up = None
    if result.payment.status is sm.PaymentStatus.AUTHORIZED and rec.auto_capture:
        follow_up = ("capture", result.payment.amount_authorized, True, "worker")
    return Change(result, rec.payment.version, new_operation=follow_up)


def operation_change(op: Operation, p: sm.Payment, result: ProcessingResult) -> Change:
    """The change that persists an operation's outcome and ends (or parks) the operation."""
    if result.outcome is Outcome.APPROVED:
        finish = OperationFinish(op.id, "succeeded")
    elif result.outcome is Outcome.TIMEOUT or result.outcome is None:
        finish = OperationFinish(op.id, "pending_verification")
    else:
        code = result.attempts[-1].code if result.attempts else None
        finish = OperationFinish(op.id, "failed", code or result.outcome.value)
    return Change(result, p.version, operation_id=op.id, finish=finish)


class Worker(Protocol):
    """What the batch step uses of its worker (processing/worker.py)."""

    pstore: ProcessingStore
    settings: WorkerSettings
    router: Router
    policy: RetryPolicy
    metrics: PipelineMetrics
    shared: bool
    errors: int
    intents: Batcher[Intent, None]
    applies: Batcher[Change, Applied]
    releases: Batcher[str, None]
    _tasks: set[asyncio.Task[None]]
    _locks: dict[str, asyncio.Lock]
    _rescan: bool

    def failed(self) -> None: ...

    @property
    def clients(self) -> Mapping[str, PSPClient]: ...
    def _lock(self, payment_id: str) -> asyncio.Lock: ...
    async def _db(self, fn: Callable[..., T], *args: Any) -> T: ...
    async def _apply(self, change: Change) -> Applied: ...
    async def _process_payment(self, payment_id: str) -> None: ...
    async def process_payment(self, payment_id: str) -> None: ...
    async def _drive_operation(self, op: Operation, p: sm.Payment, unresolved: list[AttemptRow],
                               recorded: str | None = None) -> None: ...
    def authorization_applied(self, result: ProcessingResult) -> None: ...
    def operation_applied(self, op: Operation, change: Change) -> None: ...


class _Capture:
    __slots__ = ("op", "payment", "recorded", "run")

    def __init__(self, op: Operation, payment: sm.Payment, run: OperationRun, recorded: str | None) -> None:
        self.op, self.payment, self.run, self.recorded = op, payment, run, recorded


async def settle_batch(w: Worker, payment_ids: list[str], finished: Callable[[str], None]) -> None:
    step = _Step(w, finished)
    try:
        await step.run(payment_ids)
    except Exception:
        w.failed()  # what is left `processing` is found by the next scan
        log.exception("a batch of %d payments failed; the reconciler takes them up again", len(payment_ids))
    finally:
        await step.release_all()


class _Step:
    def __init__(self, w: Worker, finished: Callable[[str], None]) -> None:
        self.w = w
        self.finished = finished
        self.held: set[str] = set()  # payments whose lock (and claim) this step holds
        self._ending: list[str] = []  # held payments the step is done with, released by `_end`
        self._failed: set[str] = set()  # payments left for the next scan (`Worker.failed` once released)

    async def run(self, payment_ids: list[str]) -> None:
        w = self.w
        held = await self._hold(payment_ids)
        if not held:
            return
        recs = await w._db(w.pstore.load_many, held)
        attempts = await w._db(w.pstore.attempts_many, [(pid, None) for pid in held])
        runs: list[tuple[PaymentRecord, AuthorizationRun]] = []
        for pid, rec, rows in zip(held, recs, attempts, strict=True):
            if rec is None or rec.payment.status not in (sm.PaymentStatus.PROCESSING,
                                                         sm.PaymentStatus.PENDING_VERIFICATION):
                self._ending.append(pid)
            elif (rec.payment.status is sm.PaymentStatus.PROCESSING
                  and not any(a.operation == "authorize" and a.status in UNRESOLVED for a in rows)):
                runs.append((rec, AuthorizationRun(rec.payment, w.router, w.clients, now_ms, token=rec.token,
                                                   policy=w.policy)))
            else:
                self._hand_over(pid, w._process_payment(pid))  # resolution: the one-payment path
        await self._end()
        calls = [(rec, run, row) for rec, run in runs if (row := run.next_call()) is not None]
        ready = [(rec, run) for rec, run in runs if run.done]  # no PSP to call: failed at once
        if calls:
            await w._db(w.pstore.record_intents, [Intent(row) for _, _, row in calls])
        auths: dict[asyncio.Future[PSPResult], tuple[PaymentRecord, AuthorizationRun]] = {
            asyncio.ensure_future(run.send()): (rec, run) for rec, run, _ in calls}
        captures: dict[asyncio.Future[PSPResult], _Capture] = {}
        if ready:
            await self._apply_authorizations(ready, captures)
            await self._end()
        while auths or captures:
            done, pending = await asyncio.wait([*auths, *captures], return_when=asyncio.FIRST_COMPLETED)
            linger = w.settings.wave_linger_ms / 1000
            if pending and linger > 0:
                # Answers that arrive within the linger join this wave (one transaction for all).
                more, _ = await asyncio.wait(pending, timeout=linger)
                done |= more
            authorized = []
            captured = []
            for fut in done:
                if fut in auths:
                    rec, run = auths.pop(fut)
                    if not self._answered(fut, rec.payment.id):
                        self._ending.append(rec.payment.id)
                    elif run.on_result(fut.result()):  # another attempt: the one-payment path
                        self._hand_over(rec.payment.id, self._continue_authorization(rec, run))
                    else:
                        authorized.append((rec, run))
                else:
                    c = captures.pop(fut)
                    if not self._answered(fut, c.payment.id):
                        self._ending.append(c.payment.id)
                    elif c.run.on_result(fut.result()):
                        self._hand_over(c.payment.id, self._continue_capture(c))
                    else:
                        captured.append(c)
            if authorized:
                await self._apply_authorizations(authorized, captures)
            if captured:
                await self._apply_captures(captured)
            await self._end()

    def _answered(self, fut: asyncio.Future[PSPResult], payment_id: str) -> bool:
        """A call that raised leaves its `started` attempt for the next scan to resolve by its key."""
        e = fut.exception()
        if e is None:
            return True
        # Counted as failed once the step lets go of it (`_end`): a scan before that would skip it.
        self._failed.add(payment_id)
        log.error("payment %s: PSP call failed (%r); the next scan resolves it by its key", payment_id, e)
        return False

    async def _apply_authorizations(self, ready: list[tuple[PaymentRecord, AuthorizationRun]],
                                    captures: dict[asyncio.Future[PSPResult], _Capture]) -> None:
        w = self.w
        changes = [authorization_change(rec, run.result) for rec, run in ready]
        applied = await self._apply(changes)
        intents: list[Intent] = []
        for (rec, run), change, a in zip(ready, changes, applied, strict=True):
            pid = rec.payment.id
            if not a.applied:
                log.error("payment %s changed since version %d; the reconciler takes it up again", pid,
                          change.base_version)
                self._ending.append(pid)
                continue
            w.authorization_applied(run.result)
            if a.operation is None:
                self._ending.append(pid)
                continue
            state = run.result.transitions[-1].payment
            capture = self._capture(a, state)
            if capture is None:
                self._hand_over(pid, w._drive_operation(a.operation, state, [],
                                                        a.intent.attempt_id if a.intent else None))
                continue
            row = capture.run.next_call()
            assert row is not None
            if row.attempt_id != capture.recorded:
                intents.append(Intent(row, a.operation.id))
            captures[asyncio.ensure_future(capture.run.send())] = capture
        if intents:
            # Only where the auto-capture's first intent was not written with the authorization.
            await w._db(w.pstore.record_intents, intents)

    def _capture(self, a: Applied, p: sm.Payment) -> _Capture | None:
        """The auto-capture of `p` as a run, or None where the one-payment path must take it (no
        client for its PSP, or a capture the state machine refuses: that path finishes it failed)."""
        op = a.operation
        assert op is not None
        client = self.w.clients.get(p.psp or "")
        if client is None or op.kind != "capture":
            return None
        try:
            sm.check_capture(p, op.amount)
        except sm.TransitionError:
            return None
        run = OperationRun(p, "capture", op.amount, op.final_capture, client, op.psp_idempotency_key, now_ms,
                           policy=self.w.policy, actor=op.actor)
        return _Capture(op, p, run, a.intent.attempt_id if a.intent else None)

    async def _apply_captures(self, captured: list[_Capture]) -> None:
        changes = [operation_change(c.op, c.payment, c.run.result) for c in captured]
        applied = await self._apply(changes)
        for c, change, a in zip(captured, changes, applied, strict=True):
            if a.applied:
                self.w.operation_applied(c.op, change)
            else:
                log.error("payment %s changed since version %d; the reconciler takes its capture up again",
                          c.payment.id, change.base_version)
            self._ending.append(c.payment.id)

    async def _apply(self, changes: list[Change]) -> list[Applied]:
        # Through the worker's group commit: the waves of concurrent steps (and the one-payment path's
        # outcomes) that reach it within the wave linger share one transaction.
        return await self.w.applies.submit_many(changes, self.w.settings.wave_linger_ms / 1000)

    # -- the one-payment path, for what leaves the batch ---------------------------------------------

    async def _continue_authorization(self, rec: PaymentRecord, run: AuthorizationRun) -> None:
        w = self.w

        async def intent(row: AttemptRow) -> None:
            await w.intents.submit(Intent(row))

        result = await drive_authorization(run, record_intent=intent, delay_s=run.delay_s or 0.0)
        applied = await w._apply(authorization_change(rec, result))
        w.authorization_applied(result)
        if applied.operation is not None:
            recorded = applied.intent.attempt_id if applied.intent is not None else None
            await w._drive_operation(applied.operation, result.transitions[-1].payment, [], recorded)

    async def _continue_capture(self, c: _Capture) -> None:
        w = self.w

        async def intent(row: AttemptRow) -> None:
            await w.intents.submit(Intent(row, c.op.id))

        result = await drive_operation(c.run, record_intent=intent, recorded=c.recorded, delay_s=c.run.delay_s)
        change = operation_change(c.op, c.payment, result)
        await w._apply(change)
        w.operation_applied(c.op, change)

    def _hand_over(self, payment_id: str, work: Awaitable[None]) -> None:
        """`work` goes on as a task of its own, which takes over the payment's lock and claim from this
        step and gives them back when it ends."""
        w = self.w
        self.held.discard(payment_id)

        async def run() -> None:
            try:
                await work
            except Exception:
                w.failed()
                log.exception("processing payment %s failed; the reconciler will retry it", payment_id)
            finally:
                await self._release(payment_id)

        task = asyncio.ensure_future(run())
        w._tasks.add(task)
        task.add_done_callback(w._tasks.discard)

    # -- locks and claims ------------------------------------------------------------------------------

    async def _hold(self, payment_ids: list[str]) -> list[str]:
        w = self.w
        free = []
        for pid in dict.fromkeys(payment_ids):
            lock = w._lock(pid)
            if lock.locked():
                # Being driven already (an operation, a resumed challenge): the one-payment path waits.
                self._hand_over_unheld(pid)
                continue
            await lock.acquire()
            free.append(pid)
            self.held.add(pid)
        if w.shared and free:
            claimed = await w._db(w.pstore.claim_many, free)
            for pid, ok in zip(list(free), claimed, strict=True):
                if not ok:  # another worker drives it now; the scan comes back if it is left unfinished
                    self.held.discard(pid)
                    self._unlock(pid)
                    self.finished(pid)
                    free.remove(pid)
        return free

    def _hand_over_unheld(self, payment_id: str) -> None:
        w = self.w

        async def run() -> None:
            try:
                await w.process_payment(payment_id)
            except Exception:
                log.exception("processing payment %s failed; the reconciler will retry it", payment_id)
            finally:
                self.finished(payment_id)

        task = asyncio.ensure_future(run())
        w._tasks.add(task)
        task.add_done_callback(w._tasks.discard)

    def _unlock(self, payment_id: str) -> None:
        lock = self.w._locks.get(payment_id)
        if lock is not None:
            lock.release()
            if not lock._waiters:
                self.w._locks.pop(payment_id, None)

    async def _end(self) -> None:
        """The step is done with the payments in `_ending`: their claims go in one statement."""
        ids = [pid for pid in dict.fromkeys(self._ending) if pid in self.held]
        self._ending.clear()
        self.held.difference_update(ids)
        try:
            if self.w.shared and ids:
                await self.w._db(self.w.pstore.release_many, ids)
        finally:
            for pid in ids:
                self._unlock(pid)
                self.finished(pid)
                if pid in self._failed:
                    self._failed.discard(pid)
                    self.w.failed()

    async def _release(self, payment_id: str) -> None:
        """A payment handed over to a task of its own, released by that task."""
        try:
            if self.w.shared:
                await self.w.releases.submit(payment_id)
        finally:
            self._unlock(payment_id)
            self.finished(payment_id)

    async def release_all(self) -> None:
        self._ending.extend(self.held)
        await self._end()
