"""What both modes share: the fast-path call with its wait for durability, and the runtime interface
the API and the workers are handed.

A create costs one call into Rust (validation, idempotency, rate limit, risk, WAL append, all with
the GIL released). That call never waits for the disk: it returns the LSN of the record, and the
request awaits a future that the group-commit notification (an eventfd registered with the event
loop) resolves, so one event loop keeps thousands of requests in flight while they share fsyncs.
Invariant: a 2xx `CreateAnswer` is only returned once its record is durable in the sense of the
mode (DESIGN.md: `wal` = fsynced locally; cluster `kafka` = also acknowledged by the broker;
cluster `replicated` = acknowledged by a quorum of brokers, the local fsync behind: `wait_wal` False).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec

from gateway.config import Config
from gateway.domain.errors import error_body
from gateway.runtime.changes import ChangeBus
from gateway.runtime.waiters import LsnWaiters
from gateway.store.base import Merchant

if TYPE_CHECKING:
    from gateway._fastpath import FastPath
    from gateway.feed.eventlog import EventLog
    from gateway.risk.control import RiskControl
    from gateway.store.merchants import MerchantAdmin
    from gateway.store.processing import ProcessingStore

log = logging.getLogger("gateway.runtime")

T = TypeVar("T")
# How often the expiry of durability waits is checked: one timer for all requests, not one each.
EXPIRE_TICK_S = 0.1


class CreateAnswer(msgspec.Struct, frozen=True):
    """The outcome of a create, before it becomes an HTTP response (a frozen struct: one is made per
    request, and a frozen dataclass costs ten times as much to build).

    `lsn` > 0: a record was written (and is durable unless `status` is 503); `payment_id` is set when
    this call wrote a payment's record; `echo_key`: the answer names the request's Idempotency-Key."""

    status: int
    body: bytes
    lsn: int = 0
    payment_id: str | None = None
    replayed: bool = False
    retry_after_s: int | None = None
    echo_key: bool = False


def unavailable(code: str, message: str) -> CreateAnswer:
    return CreateAnswer(503, error_body(503, code, message), retry_after_s=1)


def starting() -> CreateAnswer:
    return unavailable("starting", "The gateway is starting.")


def admin_key_digests(cfg: Config) -> list[str]:
    """SHA-256 digests of the admin keys the admin API accepts: the configured digest, and the key in
    the environment variable named by `[risk] admin_key_env` (the key itself is never stored)."""
    digests = [cfg.risk.admin_key_sha256] if cfg.risk.admin_key_sha256 else []
    key = os.environ.get(cfg.risk.admin_key_env, "")
    if key:
        digests.append(hashlib.sha256(key.encode()).hexdigest())
    if not digests:
        log.warning("no admin key configured ([risk] admin_key_env or admin_key_sha256): the admin API refuses all")
    return digests


def start_risk_control(cfg: Config, store: Any, fastpath: FastPath, publish: Any = None) -> RiskControl:
    """The risk control plane over the mode's store: restores the live engine (rulesets, lists, model)
    from what is stored; `publish` announces committed changes to the other processes (cluster)."""
    from gateway.risk import control as ctl

    if cfg.risk.geoip_file:
        fastpath.set_geo_csv(Path(cfg.risk.geoip_file).read_text())
    model_path = Path(cfg.risk.model_path) if cfg.risk.model_path else ctl.SHIPPED_MODEL
    pool = getattr(store, "pool", None) if publish is not None else None
    control = ctl.RiskControl(store, fastpath.risk, model_path, pg_pool=pool, publish=publish)
    control.restore()
    return control


class Durability:
    """Requests waiting for the WAL's group commit, released by the fast path's commit notification."""

    def __init__(self, fastpath: FastPath, loop: asyncio.AbstractEventLoop, wait_ms_max: int) -> None:
        self.fastpath = fastpath
        self.loop = loop
        self.wait_s_max = wait_ms_max / 1000
        self.waiters = LsnWaiters("WAL commit took longer than durable_wait_ms_max")
        # Called with the committed LSN after each group commit (embedded: the materialising child).
        self.on_committed: list[Callable[[int], None]] = []
        # The store's record of a key, (fingerprint, status, body, created_ms), read when the fast
        # path's memory table misses a key its filter may have seen (embedded mode).
        self.durable_lookup: Callable[[str, str], tuple[str, int, bytes, int] | None] | None = None
        self.durable_lookups = 0
        # False (durability "replicated"): `accept` returns once the record is written, and the caller
        # waits for the brokers' acknowledgement instead of the local fsync.
        self.wait_wal = True
        self._running = False

    def start(self) -> None:
        self._running = True
        self.loop.add_reader(self.fastpath.notify_fd(), self.on_commit)
        self.loop.call_later(EXPIRE_TICK_S, self._expire)

    def stop(self) -> None:
        """After this the fast path may be closed; `on_commit` then releases what it flushed."""
        self._running = False
        self.loop.remove_reader(self.fastpath.notify_fd())

    def on_commit(self) -> None:
        fp = self.fastpath
        fp.drain_notify()
        committed = fp.committed_lsn()
        self.waiters.release(committed)
        for hook in self.on_committed:
            hook(committed)
        if len(self.waiters) and fp.wal_error() is not None:
            self.waiters.fail_all(OSError(fp.wal_error()))

    def _expire(self) -> None:
        self.waiters.expire()
        if self._running and not self.loop.is_closed():
            self.loop.call_later(EXPIRE_TICK_S, self._expire)

    async def accept(self, merchant: Merchant, idem_key: str | None, body: bytes,
                     velocity: list[int] | None = None,
                     remember: Callable[[str, str, bytes, int], None] | None = None) -> CreateAnswer:
        """The Rust call and the wait for the group commit. `velocity`: the payment's velocity counters
        from a shared store (cluster mode), used by the risk stage instead of the fast path's own.
        `remember(merchant_id, payment_id, body, lsn)` is called for an accepted payment BEFORE the wait, so that the
        feed, which may apply the record before this request resumes, always finds it to forget."""
        fp = self.fastpath
        r = (fp.create_payment(merchant.id, idem_key, body) if velocity is None
             else fp.create_payment(merchant.id, idem_key, body, velocity=velocity))
        if r.check_durable and idem_key is not None:
            # Rare: evicted from the memory table (or a filter false positive). One indexed read of the
            # store, then the same call with its answer: replay, mismatch, or a first use after all.
            self.durable_lookups += 1
            record = self.durable_lookup(merchant.id, idem_key) if self.durable_lookup is not None else None
            r = fp.create_payment(merchant.id, idem_key, body, velocity=velocity, checked=True, durable=record)
        # (Each attribute of the result is read once: every read of one builds a new Python object.)
        status, lsn, payment_id = r.status, r.lsn, r.payment_id
        body = r.body
        # Only a 2xx body is the payment object; a 402 body is the decline error.
        if remember is not None and lsn and payment_id is not None and status < 300:
            remember(merchant.id, payment_id, body, lsn)
        if lsn and self.wait_wal and fp.committed_lsn() < lsn:
            fut = self.waiters.add(self.loop, lsn, self.wait_s_max)
            try:
                await fut
            except OSError as e:
                log.error("payment %s not confirmed durable: %s", payment_id, e)
                return CreateAnswer(503, error_body(
                    503, "storage_unavailable",
                    "The payment could not be confirmed as stored; retry with the same Idempotency-Key."),
                    lsn=lsn, payment_id=payment_id, retry_after_s=1)
        return CreateAnswer(status, body, lsn, payment_id, r.replayed, r.retry_after_s,
                            echo_key=idem_key is not None and status < 500)


def disk_metrics(data_dir: Path) -> str:
    """Free and total bytes of the file system that holds the data dir (WAL, database): a statvfs per scrape."""
    try:
        st = os.statvfs(data_dir)
    except OSError:
        return ""
    return (
        "# HELP gateway_disk_free_bytes Bytes available to the gateway on the data dir's file system.\n"
        f"# TYPE gateway_disk_free_bytes gauge\ngateway_disk_free_bytes {st.f_bavail * st.f_frsize}\n"
        "# HELP gateway_disk_size_bytes Size of the data dir's file system.\n"
        f"# TYPE gateway_disk_size_bytes gauge\ngateway_disk_size_bytes {st.f_blocks * st.f_frsize}\n"
    )


class Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_each(*parts: Stoppable | None) -> None:
    """Stops each of `parts` in the order given, skipping those that are None (never started, or not
    part of this configuration)."""
    for part in parts:
        if part is not None:
            part.stop()


class Runtime:
    """The interface the API is built from; `EmbeddedRuntime` and `ClusterRuntime` implement it.

    Lifecycle: `start(loop)` on the server's event loop before the first request, `stop(loop)` after
    the last; `ready` is true in between."""

    config: Config
    data_dir: Path
    fastpath: FastPath | None = None
    durability: Durability | None = None
    processing: ProcessingStore | None = None
    changes: ChangeBus | None = None
    risk_control: RiskControl | None = None
    admin_digests: list[str]
    ready: bool = False
    _merchant_admin: MerchantAdmin | None = None

    def __init__(self, config: Config, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.admin_digests = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    def _start_common(self, loop: asyncio.AbstractEventLoop, store: Any, fastpath: FastPath,
                      recheck_s: float | None, publish: Any = None) -> None:
        """What every mode starts over its store and fast path: the wait for durability, the processing
        store, the change bus (`recheck_s`: None where every change is announced) and the risk control
        plane (`publish`: how committed risk changes reach the other processes, None for none)."""
        from gateway.store.processing import ProcessingStore

        self.durability = Durability(fastpath, loop, self.config.server.durable_wait_ms_max)
        self.durability.start()
        self.processing = ProcessingStore(store)
        self.changes = ChangeBus(loop, recheck_s=recheck_s)
        self.risk_control = start_risk_control(self.config, store, fastpath, publish)
        self.admin_digests = admin_key_digests(self.config)

    def _stop_fastpath(self) -> None:
        """Closes the fast path (its WAL flushed) and releases the requests whose records that flushed."""
        if self.fastpath is not None and self.durability is not None:
            self.durability.stop()
            self.fastpath.close()
            self.durability.on_commit()

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    def merchant_by_key_hash(self, digest: str) -> Merchant | None:
        raise NotImplementedError

    def merchant_admin(self) -> MerchantAdmin | None:
        """Merchant management (store/merchants.py) over the mode's store; None before it is open."""
        store = getattr(self, "store", None)
        if store is None:
            return None
        if self._merchant_admin is None:
            from gateway.store.merchants import MerchantAdmin

            self._merchant_admin = MerchantAdmin(store)
        return self._merchant_admin

    async def create(self, merchant: Merchant, idem_key: str | None, body: bytes) -> CreateAnswer:
        raise NotImplementedError

    async def read_payment(self, merchant_id: str, payment_id: str, fresh: bool = False) -> bytes | None:
        """The payment's JSON, None if it is not this merchant's; `fresh`: from the store of record,
        skipping any read-your-writes copy (after a wait for the payment to settle)."""
        raise NotImplementedError

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A processing-store call: inline where the store is local, on a thread where it is remote."""
        raise NotImplementedError

    def submit_operation(self, operation_id: str) -> None:
        """Hands an accepted capture/void/refund to the workers (a hint: their scans find it anyway)."""

    async def accepted_not_yet_stored(self, merchant_id: str, payment_id: str) -> bool:
        """The payment is acknowledged but no worker has stored it yet (an operation on it is early)."""
        return False

    def event_log(self) -> tuple[EventLog, str]:
        """Every recorded payment of the deployment, for backtests, and the name of its kind."""
        raise NotImplementedError

    def healthy(self) -> bool:
        fp = self.fastpath
        return self.ready and fp is not None and fp.wal_error() is None

    def metrics_text(self) -> str:
        """The fast path's stage metrics and what waits for durability; modes add their own."""
        fp = self.fastpath
        if fp is None:
            return ""
        waiting = len(self.durability.waiters) if self.durability is not None else 0
        return fp.metrics_text() + disk_metrics(self.data_dir) + (
            "# HELP gateway_durable_waiters Requests waiting for their WAL record to be durable.\n"
            f"# TYPE gateway_durable_waiters gauge\ngateway_durable_waiters {waiting}\n")

