"""The async path's metrics (one `PipelineMetrics` per payment worker), exported by the process that
runs the worker: embedded mode's worker child reports its text to the HTTP process, which serves it
on the gateway's `/metrics`; each cluster `gateway worker` serves it on its own metrics port.

The hooks on the hot path are counter increments (a final status, a PSP call, a webhook attempt);
everything that is a view of live state (breaker states, bulkheads, the worker's queue) is read when
the text is rendered, and everything the store knows better (pending_verification payments, the oldest
undelivered webhook, the ledger's balance, reconciliation discrepancies) is refreshed by
`refresh_from_store` on an interval, never per payment. docs/operations.md lists every metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from gateway.domain.metrics import Labels, Registry

if TYPE_CHECKING:
    from gateway.psp.bulkhead import Bulkhead
    from gateway.psp.routing import Router
    from gateway.store.health import LedgerCheck, Snapshot
    from gateway.store.processing import ProcessingStore

log = logging.getLogger("gateway.worker")

BREAKER_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class PipelineMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.final = r.counter(
            "gateway_payments_final_total",
            "Payments that left processing for a final status (authorized or failed), by status and decline code.",
            ("status", "decline_code"))
        self.ack_to_final = r.histogram(
            "gateway_payment_ack_to_final_seconds",
            "Time from the acknowledgement of a payment (its WAL record) to its final status.")
        self.pending_verification_total = r.counter(
            "gateway_payments_pending_verification_total",
            "Authorizations that ended in a PSP timeout and went to pending_verification.")
        self.operations = r.counter(
            "gateway_operations_total", "Captures, voids and refunds finished by the worker, by kind and status.",
            ("kind", "status"))
        self.psp_requests = r.counter(
            "gateway_psp_requests_total", "PSP calls by PSP, operation and outcome.", ("psp", "operation", "outcome"))
        self.psp_latency = r.histogram(
            "gateway_psp_request_seconds", "Duration of PSP calls, by PSP and operation.", ("psp", "operation"))
        self.worker_errors = r.counter(
            "gateway_worker_errors_total", "Payments or operations whose processing raised (retried by the scan).")
        self.webhooks = r.counter(
            "gateway_webhook_deliveries_total",
            "Webhook delivery attempts by outcome (delivered, retrying, failed: given up after attempts_max).",
            ("outcome",))
        self.pending_verification = r.gauge(
            "gateway_payments_pending_verification", "Payments waiting in pending_verification (store count).")
        self.undelivered = r.gauge("gateway_webhook_undelivered", "Webhook deliveries still pending.")
        self.oldest_undelivered = r.gauge(
            "gateway_webhook_oldest_undelivered_age_seconds",
            "Age of the oldest event with a webhook delivery still pending (0 when none).")
        self.ledger_balanced = r.gauge(
            "gateway_ledger_balanced", "1 when the last ledger check found debits equal to credits, else 0.")
        self.ledger_imbalance = r.gauge(
            "gateway_ledger_imbalance_minor", "Debits minus credits per currency at the last ledger check.",
            ("currency",))
        self.ledger_unbalanced = r.gauge(
            "gateway_ledger_unbalanced_postings", "Postings whose lines do not balance, at the last check.")
        self.ledger_checked = r.gauge(
            "gateway_ledger_last_check_timestamp_seconds", "Unix time of the last ledger check.")
        self.ledger_check_seconds = r.gauge(
            "gateway_ledger_check_duration_seconds", "How long the last ledger check took.")
        self.reconciliation = r.gauge(
            "gateway_reconciliation_discrepancies",
            "Discrepancies found by the latest settlement reconciliation run of each PSP.", ("psp",))
        self.store_refreshed = r.gauge(
            "gateway_worker_store_check_timestamp_seconds", "Unix time the store counts above were last read.")

    def bind(self, router: Router, bulkheads: dict[str, Bulkhead], backlog: Callable[[], int]) -> None:
        """The live-state gauges of a worker: read at render time, nothing to maintain per payment."""
        r = self.registry

        def breakers() -> Iterable[tuple[Labels, float]]:
            return [((name, ), BREAKER_STATE_VALUE[b.observed_state().value]) for name, b in router.breakers.items()]

        r.gauge("gateway_psp_breaker_state", "Circuit breaker per PSP: 0 closed, 1 half-open, 2 open.",
                ("psp",), breakers)
        r.gauge("gateway_psp_inflight", "PSP calls in flight from this worker.", ("psp",),
                lambda: [((n,), b.inflight) for n, b in bulkheads.items()])
        r.gauge("gateway_psp_inflight_capacity_ratio",
                "PSP calls in flight from this worker as a share of the PSP's capacity.", ("psp",),
                lambda: [((n,), b.inflight / b.capacity_inflight) for n, b in bulkheads.items()])
        r.gauge("gateway_psp_bulkhead_waiting", "Calls waiting at a PSP's bulkhead ([psp] inflight_share_max).",
                ("psp",), lambda: [((n,), b.waiting) for n, b in bulkheads.items()])
        r.gauge("gateway_worker_backlog_items", "Payments and operations queued or in progress in this worker.",
                (), lambda: [((), backlog())])

    # -- hooks (counters only) -------------------------------------------------------------------

    def psp_call(self, psp: str, operation: str, outcome: str, seconds: float) -> None:
        self.psp_requests.inc((psp, operation, outcome))
        self.psp_latency.observe(seconds, (psp, operation))

    def payment_final(self, status: str, decline_code: str | None, accepted_ms: int | None) -> None:
        self.final.inc((status, decline_code or ""))
        if accepted_ms:
            self.ack_to_final.observe(max(0.0, time.time() - accepted_ms / 1000))

    # -- from the store, on an interval ----------------------------------------------------------

    def store_counts(self, snap: Snapshot) -> None:
        self.pending_verification.set(snap.pending_verification)
        self.undelivered.set(snap.undelivered)
        self.oldest_undelivered.set(snap.oldest_undelivered_age_s)
        for psp, n in snap.reconciliation_discrepancies.items():
            self.reconciliation.set(n, (psp,))
        self.store_refreshed.set(time.time())

    def ledger(self, check: LedgerCheck) -> None:
        self.ledger_balanced.set(1 if check.balanced else 0)
        for currency, diff in check.imbalance_minor.items():
            self.ledger_imbalance.set(diff, (currency,))
        self.ledger_unbalanced.set(check.unbalanced_postings)
        self.ledger_checked.set(check.checked_at_s)
        self.ledger_check_seconds.set(check.duration_s)


async def refresh_loop(metrics: PipelineMetrics, db: Callable[..., Awaitable[Any]], pstore: ProcessingStore,
                       check_interval_ms: int, ledger_check_interval_ms: int) -> None:
    """Reads the store's counts every `check_interval_ms` and checks the ledger every
    `ledger_check_interval_ms` (a task on the worker's event loop; `db` runs a store call)."""
    next_ledger = 0.0
    while True:
        try:
            metrics.store_counts(await db(pstore.health_snapshot))
            if time.monotonic() >= next_ledger:
                next_ledger = time.monotonic() + ledger_check_interval_ms / 1000
                check = await db(pstore.ledger_check)
                metrics.ledger(check)
                if not check.balanced:
                    log.error("ledger check: debits != credits (per currency: %s; unbalanced postings: %d)",
                              check.imbalance_minor, check.unbalanced_postings)
        except Exception:
            log.exception("reading the store's counts for the metrics failed; retrying")
        await asyncio.sleep(check_interval_ms / 1000)
