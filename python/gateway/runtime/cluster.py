"""Cluster mode in the API: several gateway processes behind one port, sharing Redis, Kafka, PostgreSQL.

`GatewayApp` calls in here at three points when `server.mode = "cluster"`: `start`/`stop` (from
`__rsgi_init__`/`__rsgi_del__`), `create_payment` and `get_payment`. Per process:

- **Its own WAL**, in `data_dir/proc-<n>/wal`: the process claims the first free slot `n` with an
  flock on `data_dir/proc-<n>.lock` (held for its life), so a restarted process reuses a slot whose
  owner died and its relay resumes from that slot's checkpoint.
- **A relay** (feed/relay.py) ships the WAL to Kafka; workers (`gateway worker`) write PostgreSQL.
- **Shared state on Redis** (shared/redis_state.py): before the Rust call, one script checks the cached
  response of the (merchant, key), takes a token from the merchant's shared bucket and takes the
  `SET NX` lock of the key; after the record is durable, one pipeline caches the response, keeps the
  payment readable until a worker has written it (read-your-writes across processes) and drops the lock.
- **Redis down**: a create answers `503` with `Retry-After` and nothing is written, so no request can be
  accepted twice; reads fall back to PostgreSQL. A failure *after* the record is durable still answers
  2xx (the payment exists); a retry then converges on the same payment id, derived from (merchant,
  key), which PostgreSQL's primary key stores once.
- **Durability**: `wal` answers after the local fsync; `kafka` after the fsync *and* the broker's
  acknowledgement of that record (the relay's contiguously acked LSN).
- **Velocity** (`cluster.velocity = "shared"`): the admission script also counts the admitted payment in
  the shared velocity windows (shared/redis_velocity.py) and returns its counters, which the Rust call
  decides with (`accept_payment(..., velocity=...)`) instead of this process's own store.
- **Payment processing** (capture, void, refund, list; api/operations.py) reads and writes PostgreSQL;
  the `gateway worker` processes drive the payments (runtime/cluster_worker.py).
- **Risk updates**: a subscriber thread on the `cluster.risk_channel` pub/sub channel calls the
  handlers registered in `gateway.shared.redis_state.RISK_HANDLERS`. The risk control plane
  (`RiskControl` on PostgreSQL, `start_risk`) publishes every committed change there and registers
  `apply_update`; it also compares the stored ruleset version every `RISK_POLL_S` seconds.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import redis

from gateway._fastpath import FastPath
from gateway.domain.errors import error_body
from gateway.feed.relay import Relay, ensure_topic
from gateway.runtime.waiters import LsnWaiters
from gateway.shared.redis_state import (
    RISK_HANDLERS,
    RedisSharedState,
    RiskSubscriber,
    SharedState,
    SharedStateUnavailable,
)
from gateway.shared.redis_velocity import VelocityEvent
from gateway.store.base import Merchant
from gateway.store.postgres import PostgresStore

if TYPE_CHECKING:
    from gateway.api.app import GatewayApp, Response
    from gateway.risk.control import RiskControl

log = logging.getLogger("gateway.cluster")

JSON = ("content-type", "application/json")
SLOTS_MAX = 256
EXPIRE_TICK_S = 0.1
# How often each process compares the stored ruleset version with its own (a missed risk message).
RISK_POLL_S = 2.0


def claim_slot(data_dir: Path) -> tuple[int, int]:
    """Locks the first free `proc-<n>` slot; returns (n, fd). The fd must stay open for the process's life."""
    for n in range(SLOTS_MAX):
        fd = os.open(data_dir / f"proc-{n}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return n, fd
    raise RuntimeError(f"all {SLOTS_MAX} WAL slots in {data_dir} are taken")


def fingerprint(body: bytes) -> str:
    """Parameters of a create, independent of key order and whitespace (bytes as they are if not JSON)."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(body), order="sorted")
    except msgspec.DecodeError:
        canonical = body
    return hashlib.sha256(canonical).hexdigest()


def _unavailable() -> Response:
    return 503, [JSON, ("retry-after", "1")], error_body(
        503, "shared_state_unavailable",
        "The gateway cannot reach its shared state; nothing was created. Retry with the same Idempotency-Key.")


class Cluster:
    def __init__(self, app: GatewayApp) -> None:
        self.app = app
        self.cfg = app.config.cluster
        self.slot = -1
        self._slot_fd = -1
        self.relay: Relay | None = None
        self.shared: SharedState | None = None
        self.risk: RiskSubscriber | None = None
        self.store: PostgresStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Requests waiting for the broker's ack of their LSN (durability = "kafka"), in LSN order.
        self._ack_waiters = LsnWaiters("the broker did not acknowledge in durable_wait_ms_max")
        self._ack_scheduled = False
        self.shared_unavailable = 0
        # cluster.velocity = "shared": velocity counted in Redis by the admission script (redis_velocity.py).
        self.velocity_shared = self.cfg.velocity == "shared"
        self.velocity_shared_events = 0
        self._velocity_fastpath: FastPath | None = None  # set by start() when velocity is shared
        self.risk_control: RiskControl | None = None
        self._risk_poll_stop: Any = None
        self._risk_publisher: redis.Redis | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> tuple[PostgresStore, FastPath]:
        """Claims a WAL slot and starts the store, the fast path, the relay and the risk subscriber."""
        app = self.app
        c = self.cfg
        self._loop = loop
        self.slot, self._slot_fd = claim_slot(app.data_dir)
        proc_dir = app.data_dir / f"proc-{self.slot}"
        proc_dir.mkdir(exist_ok=True)
        self.store = PostgresStore(c.database_url, c.database_schema, c.database_pool_min, c.database_pool_max,
                                   c.database_timeout_ms)
        self.store.migrate()
        fastpath = FastPath(app.config.fastpath_json(proc_dir))
        self._velocity_fastpath = fastpath if self.velocity_shared else None
        ensure_topic(c.kafka_bootstrap, c.topic, c.topic_partitions)
        self.relay = Relay(
            str(proc_dir / "wal"), proc_dir / "relay.checkpoint", fastpath, c.kafka_bootstrap, c.topic,
            inflight_records_max=c.relay_inflight_records_max, batch_records_max=c.relay_batch_records_max,
            linger_ms=c.relay_linger_ms, message_timeout_ms=c.relay_message_timeout_ms,
            checkpoint_interval_ms=c.relay_checkpoint_interval_ms,
            on_acked=self._acked_threadsafe if c.durability == "kafka" else None,
            source_name=f"{os.uname().nodename}/proc-{self.slot}",
        )
        self.relay.start()
        self.shared = RedisSharedState(c.redis_url, c.redis_key_prefix, c.redis_pool_size, c.redis_timeout_ms,
                                       c.idempotency_ttl_s, c.recent_ttl_s)
        self.risk = RiskSubscriber(c.redis_url, c.risk_channel, c.redis_timeout_ms)
        self.risk.start()
        loop.call_later(EXPIRE_TICK_S, self._expire_ack_waiters)
        log.info("cluster mode: pid %d owns WAL slot proc-%d (relay resumes after lsn %d), durability=%s",
                 os.getpid(), self.slot, self.relay.acked_lsn, c.durability)
        return self.store, fastpath

    def start_risk(self) -> None:
        """The risk control plane on PostgreSQL: restore this engine from the store, then follow the
        changes of every process (pub/sub, plus the periodic version check)."""
        from gateway.api import risk_admin

        c = self.cfg
        timeout_s = c.redis_timeout_ms / 1000
        publisher = redis.Redis.from_url(c.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._risk_publisher = publisher

        def publish(message: dict[str, Any]) -> None:
            publisher.publish(c.risk_channel, msgspec.json.encode(message))

        self.risk_control = risk_admin._start(self.app, publish)
        RISK_HANDLERS.append(self.risk_control.apply_update)
        self._risk_poll_stop = self.risk_control.start_polling(RISK_POLL_S)

    def stop(self) -> None:
        """After the fast path is closed (WAL flushed): ship what is left, then close the clients."""
        from gateway.api import operations

        operations.stop_cluster(self.app)  # its NOTIFY listener (payment operations, `Prefer: wait`)
        if self._risk_poll_stop is not None:
            self._risk_poll_stop.set()
        if self.risk_control is not None and self.risk_control.apply_update in RISK_HANDLERS:
            RISK_HANDLERS.remove(self.risk_control.apply_update)
        if self._risk_publisher is not None:
            self._risk_publisher.close()
        if self.risk is not None:
            self.risk.stop()
        if self.relay is not None:
            self.relay.stop()
        loop = self._loop
        if self.shared is not None and loop is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(self.shared.close())
        # (On a running loop the Redis connections simply close with the process.)
        if self.store is not None:
            self.store.close()
        if self._slot_fd >= 0:
            os.close(self._slot_fd)
            self._slot_fd = -1

    # -- broker acknowledgements (durability = "kafka") -------------------------------------------

    def _acked_threadsafe(self, _lsn: int) -> None:
        # Relay poller thread: one wake-up of the loop per burst of acks, not one per record.
        if not self._ack_scheduled and self._loop is not None and not self._loop.is_closed():
            self._ack_scheduled = True
            self._loop.call_soon_threadsafe(self._drain_acks)

    def _drain_acks(self) -> None:
        self._ack_scheduled = False
        assert self.relay is not None
        self._ack_waiters.release(self.relay.acked_lsn)

    def _expire_ack_waiters(self) -> None:
        self._ack_waiters.expire()
        if self._loop is not None and self.app.ready:
            self._loop.call_later(EXPIRE_TICK_S, self._expire_ack_waiters)

    async def _wait_acked(self, lsn: int) -> bool:
        assert self.relay is not None and self._loop is not None
        if self.relay.acked_lsn >= lsn:
            return True
        fut = self._ack_waiters.add(self._loop, lsn, self.app.config.server.durable_wait_ms_max / 1000)
        if self.relay.acked_lsn >= lsn:  # acked between the check and the append
            self._drain_acks()
        try:
            await fut
        except TimeoutError:
            return False
        return True

    # -- requests --------------------------------------------------------------------------------

    async def create_payment(self, merchant: Merchant, idem_key: str | None, body: bytes) -> Response:
        shared = self.shared
        assert shared is not None
        app = self.app
        fp = fingerprint(body) if idem_key is not None else ""
        rate = merchant.rate_limit_per_s or app.config.rate_limit.per_s
        burst = merchant.rate_limit_burst or (max(1.0, merchant.rate_limit_per_s) if merchant.rate_limit_per_s
                                              else app.config.rate_limit.burst)
        # The lock outlives the longest legitimate request (WAL wait, then broker wait), so it only
        # expires by itself when its holder died.
        lock_ttl_ms = 2 * app.config.server.durable_wait_ms_max + 1_000
        try:
            adm = await shared.admit(merchant.id, idem_key, fp, rate, burst, lock_ttl_ms,
                                     velocity=self._velocity_event(merchant.id, body))
        except SharedStateUnavailable as e:
            self.shared_unavailable += 1
            log.warning("create refused with 503: shared state unavailable (%s)", e)
            return _unavailable()
        if adm.kind == "replay":
            headers = [JSON, ("idempotent-replayed", "true")]
            if idem_key is not None and adm.status < 500:
                headers.append(("idempotency-key", idem_key))
            return adm.status, headers, adm.body
        if adm.kind == "mismatch":
            return 400, [JSON], error_body(
                400, "idempotency_key_reused",
                "This Idempotency-Key was already used with other parameters.", kind="idempotency_error")
        if adm.kind == "in_flight":
            return 409, [JSON], error_body(
                409, "idempotency_key_in_use",
                "A request with this Idempotency-Key is still being processed; retry shortly.")
        if adm.kind == "rate_limited":
            return 429, [JSON, ("retry-after", str(adm.retry_after_s))], error_body(
                429, "rate_limit_exceeded", "Too many requests for this merchant; slow down.",
                kind="rate_limit_error")
        if adm.velocity is not None:
            self.velocity_shared_events += 1
        # With shared velocity the fast path decides with this payment's counters from the admission script.
        status, headers, out, lsn, payment_id, replayed = await app.accept_payment(
            merchant, idem_key, body, velocity=adm.velocity)
        if replayed and not lsn and status < 500 and self.cfg.durability == "kafka" and app.fastpath is not None:
            # A replay from this process's own table: its original record may be one that got 503
            # because the broker had not acknowledged it. Everything committed now includes it.
            # (Never below the last waiter's LSN, so the waiters stay in LSN order.)
            lsn = max(app.fastpath.committed_lsn(), self._ack_waiters.last_lsn())
        if lsn and status < 500 and self.cfg.durability == "kafka" and not await self._wait_acked(lsn):
            log.error("payment %s not acknowledged by the broker in time", payment_id)
            status, headers, out = 503, [JSON, ("retry-after", "1")], error_body(
                503, "event_bus_unavailable",
                "The payment could not be confirmed as stored; retry with the same Idempotency-Key.")
        try:
            await shared.finish(merchant.id, idem_key, fp, status, out, payment_id,
                                cache=(bool(lsn) or replayed) and status < 500)
        except SharedStateUnavailable as e:
            # The record is durable: answer as the fast path did. The lock expires by itself, and a
            # retry converges on the same payment id, written once by PostgreSQL's primary key.
            self.shared_unavailable += 1
            log.warning("could not cache the response of %s: %s", payment_id, e)
        return status, headers, out

    def _velocity_event(self, merchant_id: str, body: bytes) -> VelocityEvent | None:
        """The hashed velocity event of a create (None: velocity is local, or the body is invalid and the
        fast path will refuse it before its risk stage)."""
        fastpath = self._velocity_fastpath
        if fastpath is None:
            return None
        raw = fastpath.velocity_event(merchant_id, body)
        return VelocityEvent.from_fastpath(raw) if raw is not None else None

    async def get_payment(self, scope: Any, payment_id: str) -> Response:
        from gateway.api.app import PAYMENT_ID

        app = self.app
        auth = app.authenticate(scope)
        if not isinstance(auth, Merchant):
            return auth
        if PAYMENT_ID.match(payment_id):
            assert self.shared is not None and self.store is not None
            try:
                hit = await self.shared.recent_payment(payment_id)
            except SharedStateUnavailable:
                hit = None  # PostgreSQL is the truth; Redis only covers the worker's lag
            if hit is not None and hit[0] == auth.id:
                return 200, [JSON], hit[1]
            body = await asyncio.to_thread(self.store.get_payment, auth.id, payment_id)
            if body is not None:
                return 200, [JSON], body
        return 404, [JSON], error_body(404, "resource_missing", f"No such payment: '{payment_id[:64]}'",
                                       param="id")

    def healthy(self) -> bool:
        """Ready only while the relay runs: without it nothing reaches Kafka (and `kafka` durability
        would answer 503 to every create)."""
        return self.relay is not None and self.relay.error is None

    def metrics_text(self) -> str:
        relay = self.relay
        risk = self.risk
        fp = self.app.fastpath
        return (
            "# TYPE gateway_cluster_slot gauge\n"
            f"gateway_cluster_slot {self.slot}\n"
            "# TYPE gateway_relay_acked_lsn gauge\n"
            f"gateway_relay_acked_lsn {relay.acked_lsn if relay else 0}\n"
            "# TYPE gateway_relay_sent_records_total counter\n"
            f"gateway_relay_sent_records_total {relay.sent_records if relay else 0}\n"
            "# TYPE gateway_relay_rewinds_total counter\n"
            f"gateway_relay_rewinds_total {relay.rewinds if relay else 0}\n"
            "# TYPE gateway_shared_state_unavailable_total counter\n"
            f"gateway_shared_state_unavailable_total {self.shared_unavailable}\n"
            "# TYPE gateway_velocity_shared_events_total counter\n"
            f"gateway_velocity_shared_events_total {self.velocity_shared_events}\n"
            "# TYPE gateway_risk_updates_received_total counter\n"
            f"gateway_risk_updates_received_total {risk.received if risk else 0}\n"
            "# TYPE gateway_risk_rules_version gauge\n"
            f"gateway_risk_rules_version {fp.risk.rules_version() if fp else 0}\n"
        )
