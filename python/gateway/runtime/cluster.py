"""Cluster mode in the API: several gateway processes behind one port, sharing Redis, Kafka, PostgreSQL.

The runtime of `server.mode = "cluster"` (runtime/base.py says what a runtime is). Per process:

- **Its own WAL**, in `data_dir/proc-<n>/wal`: the process claims the first free slot `n` with an
  flock on `data_dir/proc-<n>.lock` (held for its life), so a restarted process reuses a slot whose
  owner died and its relay resumes from that slot's checkpoint.
- **A relay** (feed/relay.py) ships the WAL to Kafka; workers (`gateway worker`) write PostgreSQL.
- **Shared state on Redis** (shared/redis_state.py): before the Rust call, one script checks the cached
  response of the (merchant, key), takes a token from the merchant's shared bucket and takes the
  `SET NX` lock of the key; after the record is durable, one pipeline caches the response, keeps the
  payment readable until a worker has written it (read-your-writes across processes) and drops the lock.
- **Redis down**: a create answers `503` with `Retry-After` and nothing is written, so no request can be
  accepted twice; reads need only PostgreSQL (they read it first: `read_payment`). A failure *after* the record is durable still answers
  2xx (the payment exists); a retry then converges on the same payment id, derived from (merchant,
  key), which PostgreSQL's primary key stores once.
- **Durability**: `wal` answers after the local fsync; `kafka` after the fsync *and* the broker's
  acknowledgement of that record (the relay's contiguously acked LSN); `replicated` after the
  brokers' acknowledgement alone (acks=all, a quorum of min.insync.replicas): the WAL fsyncs on its
  own thread behind the writes and the relay ships records as soon as they are written.
- **Velocity** (`cluster.velocity = "shared"`): the admission script also counts the admitted payment in
  the shared velocity windows (shared/redis_velocity.py) and returns its counters, which the Rust call
  decides with (`Durability.accept(..., velocity=...)`, runtime/base.py) instead of this process's own store.
- **Payment processing** (capture, void, refund, list; api/operations.py) reads and writes PostgreSQL
  off the event loop; the `gateway worker` processes drive the payments (runtime/cluster_worker.py),
  and their committed changes reach `Prefer: wait` requests by NOTIFY (the change bus).
- **Risk updates**: a subscriber thread on the `cluster.risk_channel` pub/sub channel calls the
  handlers registered in `gateway.shared.redis_state.RISK_HANDLERS`. The risk control plane
  (`RiskControl` on PostgreSQL, `start_risk`) publishes every committed change there and registers
  `apply_update`; it also compares the stored ruleset version every `RISK_POLL_S` seconds.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import psycopg
import redis

from gateway._fastpath import FastPath
from gateway.config import Config
from gateway.domain.errors import error_body
from gateway.domain.idempotency import create_fingerprint
from gateway.feed.relay import Relay, ensure_topic
from gateway.runtime.backlog import ClusterBacklog
from gateway.runtime.base import CreateAnswer, Runtime, starting, stop_each, unavailable
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
from gateway.store.postgres import Listener, PostgresStore
from gateway.store.processing import CHANGES_CHANNEL

if TYPE_CHECKING:
    from gateway.feed.eventlog import EventLog

log = logging.getLogger("gateway.cluster")

T = TypeVar("T")
SLOTS_MAX = 256
EXPIRE_TICK_S = 0.1
# How often each process compares the stored ruleset version with its own (a missed risk message).
RISK_POLL_S = 2.0
# A request waiting for a payment's change re-reads PostgreSQL this often even without a notification.
CHANGES_RECHECK_S = 0.25
# The durability modes whose 2xx waits for the brokers' acknowledgement of the record.
BROKER_ACKED = ("kafka", "replicated")


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


def _shared_unavailable() -> CreateAnswer:
    return unavailable("shared_state_unavailable",
                       "The gateway cannot reach its shared state; nothing was created. Retry with the same"
                       " Idempotency-Key.")


class ClusterRuntime(Runtime):
    def __init__(self, config: Config, data_dir: Path) -> None:
        super().__init__(config, data_dir)
        self.cfg = config.cluster
        self.slot = -1
        self._slot_fd = -1
        self.relay: Relay | None = None
        self.shared: SharedState | None = None
        self.risk: RiskSubscriber | None = None
        self.store: PostgresStore | None = None
        self.listener: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Requests waiting for the broker's ack of their LSN (durability = "kafka"), in LSN order.
        self._ack_waiters = LsnWaiters("the broker did not acknowledge in durable_wait_ms_max")
        self._ack_scheduled = False
        self.shared_unavailable = 0
        # cluster.velocity = "shared": velocity counted in Redis by the admission script (redis_velocity.py).
        self.velocity_shared = self.cfg.velocity == "shared"
        self.velocity_shared_events = 0
        # Keyed creates answered from PostgreSQL's record because Redis may have forgotten the key.
        self.durable_lookups = 0
        self._risk_poll_stop: Any = None
        self._risk_publisher: redis.Redis | None = None
        # The cluster's backlog against [worker] backlog_max (runtime/backlog.py).
        self.backlog: ClusterBacklog | None = None
        self.backlog_refused = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Claims a WAL slot; starts the store, the fast path, the relay, the shared state, the risk
        control plane (restored from PostgreSQL, following every process's changes) and the change bus."""
        c = self.cfg
        self._loop = loop
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.slot, self._slot_fd = claim_slot(self.data_dir)
        proc_dir = self.data_dir / f"proc-{self.slot}"
        proc_dir.mkdir(exist_ok=True)
        store = self.store = PostgresStore(c.database_url, c.database_schema, c.database_pool_min,
                                           c.database_pool_max, c.database_timeout_ms)
        store.migrate()
        replicated = c.durability == "replicated"
        fastpath = self.fastpath = FastPath(self.config.fastpath_json(proc_dir, fsync_behind=replicated))
        ensure_topic(c.kafka_bootstrap, c.topic, c.topic_partitions, c.topic_retention_ms,
                     replication_factor=c.topic_replication_factor, min_insync_replicas=c.topic_min_insync_replicas)
        self.relay = Relay(
            str(proc_dir / "wal"), proc_dir / "relay.checkpoint", fastpath, c.kafka_bootstrap, c.topic,
            inflight_records_max=c.relay_inflight_records_max, batch_records_max=c.relay_batch_records_max,
            linger_ms=c.relay_linger_ms, message_timeout_ms=c.relay_message_timeout_ms,
            checkpoint_interval_ms=c.relay_checkpoint_interval_ms,
            on_acked=self._acked_threadsafe if c.durability in BROKER_ACKED else None,
            source_name=f"{os.uname().nodename}/proc-{self.slot}", read_written=replicated,
        )
        self.relay.start()
        self.shared = RedisSharedState(c.redis_url, c.redis_key_prefix, c.redis_pool_size, c.redis_timeout_ms,
                                       c.idempotency_ttl_s, c.recent_ttl_s)
        self.risk = RiskSubscriber(c.redis_url, c.risk_channel, c.redis_timeout_ms)
        self.risk.start()
        loop.call_later(EXPIRE_TICK_S, self._expire_ack_waiters)
        self._start_common(loop, store, fastpath, CHANGES_RECHECK_S, publish=self._risk_publish())
        assert self.durability is not None
        self.durability.wait_wal = not replicated
        self._follow_risk()
        changes = self.changes
        assert changes is not None
        self.listener = Listener(store, [CHANGES_CHANNEL], lambda _c, pid: changes.changed(pid))
        self.listener.start()
        self.backlog = ClusterBacklog(
            c.kafka_bootstrap, c.topic, c.consumer_group,
            (lambda: store.count_with_status("processing")) if self.config.worker.enabled else None,
            c.backlog_check_ms / 1000,
        ).start()
        self.ready = True
        log.info("cluster mode: pid %d owns WAL slot proc-%d (relay resumes after lsn %d), durability=%s",
                 os.getpid(), self.slot, self.relay.acked_lsn, c.durability)

    def _risk_publish(self) -> Callable[[dict[str, Any]], None]:
        """Publishes a committed risk change on the risk channel, for every process's subscriber."""
        c = self.cfg
        timeout_s = c.redis_timeout_ms / 1000
        publisher = redis.Redis.from_url(c.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._risk_publisher = publisher

        def publish(message: dict[str, Any]) -> None:
            publisher.publish(c.risk_channel, msgspec.json.encode(message))

        return publish

    def _follow_risk(self) -> None:
        """Applies every process's risk changes (pub/sub), and compares versions every RISK_POLL_S."""
        control = self.risk_control
        assert control is not None
        RISK_HANDLERS.append(control.apply_update)
        self._risk_poll_stop = control.start_polling(RISK_POLL_S)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Closes the fast path (WAL flushed), ships what is left to Kafka, then closes the clients."""
        self.ready = False
        self._stop_fastpath()
        stop_each(self.listener, self.backlog)
        if self._risk_poll_stop is not None:
            self._risk_poll_stop.set()
        if self.risk_control is not None and self.risk_control.apply_update in RISK_HANDLERS:
            RISK_HANDLERS.remove(self.risk_control.apply_update)
        if self._risk_publisher is not None:
            self._risk_publisher.close()
        stop_each(self.risk, self.relay)
        if self.shared is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(self.shared.close())
        # (On a running loop the Redis connections simply close with the process.)
        if self.store is not None:
            self.store.close()
        if self._slot_fd >= 0:
            os.close(self._slot_fd)
            self._slot_fd = -1
        log.info("gateway stopped; WAL flushed")

    # -- broker acknowledgements (durability = "kafka" or "replicated") ---------------------------

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
        if self.relay is not None and self.fastpath is not None:
            # WAL retention may remove segments the relay's checkpoint file has passed (in Kafka).
            self.fastpath.set_materialised_lsn(self.relay.checkpointed_lsn)
        if self._loop is not None and self.ready and not self._loop.is_closed():
            self._loop.call_later(EXPIRE_TICK_S, self._expire_ack_waiters)

    async def _wait_acked(self, lsn: int) -> bool:
        assert self.relay is not None and self._loop is not None
        if self.relay.acked_lsn >= lsn:
            return True
        fut = self._ack_waiters.add(self._loop, lsn, self.config.server.durable_wait_ms_max / 1000)
        if self.relay.acked_lsn >= lsn:  # acked between the check and the append
            self._drain_acks()
        try:
            await fut
        except TimeoutError:
            return False
        return True

    # -- requests --------------------------------------------------------------------------------

    def merchant_by_key_hash(self, digest: str) -> Merchant | None:
        return self.store.merchant_by_key_hash(digest) if self.store is not None else None

    async def accept(self, merchant: Merchant, idem_key: str | None, body: bytes,
                     velocity: list[int] | None) -> CreateAnswer:
        """The fast-path call of an admitted create (a seam the unit tests replace)."""
        if not self.ready or self.durability is None:
            return starting()
        return await self.durability.accept(merchant, idem_key, body, velocity=velocity)

    async def create(self, merchant: Merchant, idem_key: str | None, body: bytes) -> CreateAnswer:
        shared = self.shared
        if shared is None or not self.ready:
            return starting()
        cfg = self.config
        backlog = self.backlog.value if self.backlog is not None else None
        if backlog is not None and backlog >= cfg.worker.backlog_max:
            self.backlog_refused += 1
            return unavailable("backlog_full", "The cluster has more accepted payments in progress than its"
                               " [worker] backlog_max; nothing was created. Retry with the same Idempotency-Key.")
        fp = self._fingerprint(body) if idem_key is not None else ""
        rate = merchant.rate_limit_per_s or cfg.rate_limit.per_s
        burst = merchant.rate_limit_burst or (max(1.0, merchant.rate_limit_per_s) if merchant.rate_limit_per_s
                                              else cfg.rate_limit.burst)
        # The lock outlives the longest legitimate request (WAL wait, then broker wait), so it only
        # expires by itself when its holder died.
        lock_ttl_ms = 2 * cfg.server.durable_wait_ms_max + 1_000
        try:
            adm = await shared.admit(merchant.id, idem_key, fp, rate, burst, lock_ttl_ms,
                                     velocity=self._velocity_event(merchant.id, body))
        except SharedStateUnavailable as e:
            return self._refused_shared_down(e, "")
        if adm.kind == "replay":
            return CreateAnswer(adm.status, adm.body, replayed=True, echo_key=idem_key is not None and adm.status < 500)
        if adm.kind == "mismatch":
            return CreateAnswer(400, error_body(
                400, "idempotency_key_reused",
                "This Idempotency-Key was already used with other parameters.", kind="idempotency_error"))
        if adm.kind == "in_flight":
            return CreateAnswer(409, error_body(
                409, "idempotency_key_in_use",
                "A request with this Idempotency-Key is still being processed; retry shortly."))
        if adm.kind == "rate_limited":
            return CreateAnswer(429, error_body(
                429, "rate_limit_exceeded", "Too many requests for this merchant; slow down.",
                kind="rate_limit_error"), retry_after_s=adm.retry_after_s)
        if idem_key is not None:
            try:
                durable = await self._durable_answer(merchant.id, idem_key, fp, adm.keys_since_ms)
            except SharedStateUnavailable as e:
                # Nothing written yet; the lock `admit` took expires by itself.
                return self._refused_shared_down(e, " after admission")
            if durable is not None:
                return durable
        if adm.velocity is not None:
            self.velocity_shared_events += 1
        # With shared velocity the fast path decides with this payment's counters from the admission script.
        answer = await self.accept(merchant, idem_key, body, adm.velocity)
        lsn = answer.lsn
        kafka = self.cfg.durability in BROKER_ACKED
        if answer.replayed and not lsn and answer.status < 500 and kafka and self.fastpath is not None:
            # A replay from this process's own table: its original record may be one that got 503
            # because the broker had not acknowledged it. Everything written now includes it.
            # (Never below the last waiter's LSN, so the waiters stay in LSN order.)
            lsn = max(self.fastpath.written_lsn(), self._ack_waiters.last_lsn())
        if lsn and answer.status < 500 and kafka and not await self._wait_acked(lsn):
            log.error("payment %s not acknowledged by the broker in time", answer.payment_id)
            answer = CreateAnswer(503, error_body(
                503, "event_bus_unavailable",
                "The payment could not be confirmed as stored; retry with the same Idempotency-Key."),
                lsn=answer.lsn, payment_id=answer.payment_id, retry_after_s=1)
        try:
            await shared.finish(merchant.id, idem_key, fp, answer.status, answer.body, answer.payment_id,
                                cache=(bool(lsn) or answer.replayed) and answer.status < 500)
        except SharedStateUnavailable as e:
            # The record is durable: answer as the fast path did. The lock expires by itself, and a
            # retry converges on the same payment id, written once by PostgreSQL's primary key.
            self.shared_unavailable += 1
            log.warning("could not cache the response of %s: %s", answer.payment_id, e)
        return answer

    def _refused_shared_down(self, e: SharedStateUnavailable, when: str) -> CreateAnswer:
        """The 503 of a create refused because Redis failed before anything was written, counted."""
        self.shared_unavailable += 1
        log.warning("create refused with 503: shared state unavailable%s (%s)", when, e)
        return _shared_unavailable()

    async def _durable_answer(self, merchant_id: str, idem_key: str, fp: str,
                              keys_since_ms: int | None) -> CreateAnswer | None:
        """After Redis missed a key it may have forgotten (it lost its data less than a TTL ago), the
        answer from PostgreSQL's record of the key: a replay, a mismatch, or None (a first use). The
        lock taken by `admit` is released (and a replay cached again) before returning an answer."""
        ttl_ms = self.cfg.idempotency_ttl_s * 1000
        now = int(time.time() * 1000)
        if keys_since_ms is not None and keys_since_ms + ttl_ms <= now:
            return None  # the common case: Redis has held every key of the last TTL
        shared, store = self.shared, self.store
        assert shared is not None and store is not None
        if keys_since_ms is None:
            # Redis has no mark for this merchant: it lost its data or is new. One probe decides
            # whether anything it could have held is still within the TTL.
            recent = await self.run(store.has_idempotency_keys_since, merchant_id, now - ttl_ms)
            keys_since_ms = await shared.mark_keys_since(merchant_id, now if recent else 0)
        if keys_since_ms + ttl_ms <= now:
            return None
        self.durable_lookups += 1
        record = await self.run(store.idempotency_record, merchant_id, idem_key)
        if record is None or record[3] + ttl_ms <= now:
            return None
        stored_fp, status, body, _created = record
        if stored_fp != fp:
            await shared.release(merchant_id, idem_key)
            return CreateAnswer(400, error_body(
                400, "idempotency_key_reused",
                "This Idempotency-Key was already used with other parameters.", kind="idempotency_error"))
        await shared.finish(merchant_id, idem_key, fp, status, body, None, cache=True)
        return CreateAnswer(status, body, replayed=True, echo_key=status < 500)

    def _fingerprint(self, body: bytes) -> str:
        """The create's idempotency fingerprint: the fast path's own function (domain/idempotency.py)."""
        assert self.fastpath is not None
        return create_fingerprint(self.fastpath, body)

    def _velocity_event(self, merchant_id: str, body: bytes) -> VelocityEvent | None:
        """The hashed velocity event of a create (None: velocity is local, or the body is invalid and the
        fast path will refuse it before its risk stage)."""
        if not self.velocity_shared or self.fastpath is None:
            return None
        raw = self.fastpath.velocity_event(merchant_id, body)
        return VelocityEvent.from_fastpath(raw) if raw is not None else None

    async def read_payment(self, merchant_id: str, payment_id: str, fresh: bool = False) -> bytes | None:
        """PostgreSQL first, the Redis read-your-writes copy only for a payment PostgreSQL does not hold yet
        (or while it cannot be reached). The copy shows the payment as accepted; once a worker has stored
        it, the row is the truth whatever copy is left behind (its delete is best effort: Redis down at
        that moment, a worker killed after its commit), so a read is never staler than the worker's lag."""
        if self.store is None:
            return None
        try:
            body = await asyncio.to_thread(self.store.get_payment, merchant_id, payment_id)
        except psycopg.Error as e:
            if fresh or self.shared is None:
                raise
            copy = await self._recent_copy(merchant_id, payment_id)
            if copy is None:
                raise
            log.warning("payment %s read from its Redis copy: PostgreSQL unavailable (%s)", payment_id, e)
            return copy
        if body is not None or fresh:
            return body
        return await self._recent_copy(merchant_id, payment_id)

    async def _recent_copy(self, merchant_id: str, payment_id: str) -> bytes | None:
        if self.shared is None:
            return None
        try:
            hit = await self.shared.recent_payment(payment_id)
        except SharedStateUnavailable:
            return None
        return hit[1] if hit is not None and hit[0] == merchant_id else None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        # A PostgreSQL round trip must not stall the event loop.
        return await asyncio.to_thread(fn, *args)

    async def accepted_not_yet_stored(self, merchant_id: str, payment_id: str) -> bool:
        return await self._recent_copy(merchant_id, payment_id) is not None

    def event_log(self) -> tuple[EventLog, str]:
        from gateway.feed.eventlog import KafkaEventLog

        return KafkaEventLog(self.cfg.kafka_bootstrap, self.cfg.topic), "kafka"

    def healthy(self) -> bool:
        """Ready only while the relay runs: without it nothing reaches Kafka (and `kafka` durability
        would answer 503 to every create)."""
        return super().healthy() and self.relay is not None and self.relay.error is None

    def _backlog_figure(self) -> int:
        value = self.backlog.value if self.backlog is not None else None
        return -1 if value is None else value

    def metrics_text(self) -> str:
        relay = self.relay
        risk = self.risk
        fp = self.fastpath
        return super().metrics_text() + (
            "# HELP gateway_tailer_applied_lsn Always 0 in cluster mode (workers apply the Kafka topic).\n"
            "# TYPE gateway_tailer_applied_lsn gauge\n"
            "gateway_tailer_applied_lsn 0\n"
            "# HELP gateway_idempotency_durable_lookups_total Keys answered from the store's durable record (a miss of the memory table or Redis).\n"
            "# TYPE gateway_idempotency_durable_lookups_total counter\n"
            f"gateway_idempotency_durable_lookups_total {self.durable_lookups}\n"
            "# HELP gateway_cluster_slot This process's WAL slot (proc-<n>).\n"
            "# TYPE gateway_cluster_slot gauge\n"
            f"gateway_cluster_slot {self.slot}\n"
            "# HELP gateway_relay_acked_lsn Highest LSN of this process's WAL acknowledged by Kafka.\n"
            "# TYPE gateway_relay_acked_lsn gauge\n"
            f"gateway_relay_acked_lsn {relay.acked_lsn if relay else 0}\n"
            "# HELP gateway_relay_sent_records_total WAL records the relay sent to Kafka.\n"
            "# TYPE gateway_relay_sent_records_total counter\n"
            f"gateway_relay_sent_records_total {relay.sent_records if relay else 0}\n"
            "# HELP gateway_relay_rewinds_total Times the relay resent from its checkpoint after a producer error.\n"
            "# TYPE gateway_relay_rewinds_total counter\n"
            f"gateway_relay_rewinds_total {relay.rewinds if relay else 0}\n"
            "# HELP gateway_shared_state_unavailable_total Creates refused with 503 because Redis was unavailable.\n"
            "# TYPE gateway_shared_state_unavailable_total counter\n"
            f"gateway_shared_state_unavailable_total {self.shared_unavailable}\n"
            "# HELP gateway_velocity_shared_events_total Payments applied to the shared (Redis) velocity counters.\n"
            "# TYPE gateway_velocity_shared_events_total counter\n"
            f"gateway_velocity_shared_events_total {self.velocity_shared_events}\n"
            "# HELP gateway_risk_updates_received_total Risk control-plane changes received from other processes.\n"
            "# TYPE gateway_risk_updates_received_total counter\n"
            f"gateway_risk_updates_received_total {risk.received if risk else 0}\n"
            "# HELP gateway_risk_rules_version Version of the live global ruleset in this process.\n"
            "# TYPE gateway_risk_rules_version gauge\n"
            f"gateway_risk_rules_version {fp.risk.rules_version() if fp else 0}\n"
            "# HELP gateway_backlog_payments Accepted payments not sent to a PSP yet, cluster-wide: Kafka records the workers have not stored plus stored payments still processing (bound: [worker] backlog_max; -1 while unknown).\n"
            "# TYPE gateway_backlog_payments gauge\n"
            f"gateway_backlog_payments {self._backlog_figure()}\n"
            "# HELP gateway_backlog_refused_total Creates refused with 503 backlog_full.\n"
            "# TYPE gateway_backlog_refused_total counter\n"
            f"gateway_backlog_refused_total {self.backlog_refused}\n"
            "# HELP gateway_relay_lag_lsn WAL records of this process written but not yet acknowledged by Kafka.\n"
            "# TYPE gateway_relay_lag_lsn gauge\n"
            f"gateway_relay_lag_lsn {max(0, fp.written_lsn() - relay.acked_lsn) if fp and relay else 0}\n"
        )
