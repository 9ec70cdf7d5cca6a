"""Shared state of cluster mode on Redis: idempotency locks and cached responses, the per-merchant rate
limit, read-your-writes copies of accepted payments, and the risk-update channel.

Every create costs two round trips: one Lua script (`admit`: cached response? token bucket, `SET NX`
lock, and with `cluster.velocity = "shared"` the velocity counters of the admitted payment, see
shared/redis_velocity.py) before the Rust call, and one pipeline (`finish`: cache the response, keep the payment readable,
release the lock) after the record is durable. The keys of one merchant share a hash tag
(`{merchant}`) so the script's keys live on one slot of a Redis Cluster.

Any Redis failure raises `SharedStateUnavailable`; the API answers 503 with Retry-After rather than
accept a keyed request it cannot de-duplicate (see README, "Cluster mode").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import hiredis
import msgspec
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.shared.redis_velocity import (
    VELOCITY_LUA,
    VelocityEvent,
    check_counters,
    script_args,
    script_keys,
)
from gateway.shared.resp import RespClient, RespError, Script, pack

log = logging.getLogger("gateway.shared")

RISK_RECONNECT_S = 1.0


class SharedStateUnavailable(Exception):
    """Redis cannot be reached or did not answer in time."""


class Admission(msgspec.Struct, frozen=True):
    """What `admit` decided. kind: "ok" | "replay" | "mismatch" | "in_flight" | "rate_limited"."""

    kind: str
    status: int = 0
    body: bytes = b""
    retry_after_s: int = 0
    # With a velocity event, kind "ok": the payment's velocity counters after it was counted (for
    # `FastPath.create_payment(velocity=...)`); None: the fast path counts velocity itself.
    velocity: list[int] | None = None
    # Kind "ok" with a key: since when (ms) Redis has remembered the merchant's keys; None when Redis
    # has no such mark (it lost its data, or never had it): the caller decides, see `mark_keys_since`.
    keys_since_ms: int | None = None


_ADMIT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if KEYS[2] ~= '' then
    local cached = redis.call('GET', KEYS[2])
    if cached then return {'cached', cached} end
end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now_ms
tokens = math.min(burst, tokens + math.max(0, now_ms - ts) * rate / 1000)
if tokens < 1 then
    return {'limited', tostring(math.ceil((1 - tokens) * 1000 / rate))}
end
redis.call('HSET', KEYS[1], 't', tostring(tokens - 1), 'ts', tostring(now_ms))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
if KEYS[3] ~= '' then
    if not redis.call('SET', KEYS[3], ARGV[4], 'NX', 'PX', ARGV[3]) then
        local again = redis.call('GET', KEYS[2])
        if again then return {'cached', again} end
        return {'in_flight'}
    end
end
local since = ''
if KEYS[3] ~= '' then
    since = redis.call('GET', KEYS[#KEYS]) or ''
end
return {'ok', since}
"""

# `_ADMIT` that also counts an admitted payment in the shared velocity windows: KEYS[4..15] and
# ARGV[5..13] are those of `velocity` (shared/redis_velocity.py). A refused request counts nothing.
_ADMIT_VELOCITY = VELOCITY_LUA + _ADMIT.replace("return {'ok', since}\n", "return {'ok', since, velocity(3, 4)}\n")
assert _ADMIT_VELOCITY.count("velocity(3, 4)") == 1
_ADMIT_SCRIPT, _ADMIT_VELOCITY_SCRIPT = Script(_ADMIT), Script(_ADMIT_VELOCITY)


def _cached_value(fingerprint: str, status: int, body: bytes) -> bytes:
    return f"{fingerprint}\n{status}\n".encode() + body


def _decode_cached(raw: bytes, fingerprint: str) -> Admission:
    fp, status, body = raw.split(b"\n", 2)
    if fp.decode() != fingerprint:
        return Admission("mismatch")
    return Admission("replay", int(status), body)


class SharedState(Protocol):
    async def admit(self, merchant_id: str, idem_key: str | None, fingerprint: str, rate_per_s: float,
                    burst: float, lock_ttl_ms: int, velocity: VelocityEvent | None = None) -> Admission: ...

    async def finish(self, merchant_id: str, idem_key: str | None, fingerprint: str, status: int, body: bytes,
                     payment_id: str | None, cache: bool) -> None: ...

    async def release(self, merchant_id: str, idem_key: str) -> None: ...

    async def mark_keys_since(self, merchant_id: str, since_ms: int) -> int: ...

    async def recent_payment(self, payment_id: str) -> tuple[str, bytes] | None: ...

    async def close(self) -> None: ...


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def rate(self, merchant_id: str) -> str:
        return f"{self.prefix}:{{{merchant_id}}}:rate"

    def idem(self, merchant_id: str, key: str) -> str:
        return f"{self.prefix}:{{{merchant_id}}}:idem:{key}"

    def lock(self, merchant_id: str, key: str) -> str:
        return f"{self.prefix}:{{{merchant_id}}}:lock:{key}"

    def recent(self, payment_id: str) -> str:
        return f"{self.prefix}:pay:{payment_id}"

    def keys_since(self, merchant_id: str) -> str:
        """Since when (ms) Redis has held every key of the merchant (the last KEYS entry of `admit`)."""
        return f"{self.prefix}:{{{merchant_id}}}:idem_since"


class RedisSharedState:
    def __init__(self, url: str, prefix: str, pool_size: int, timeout_ms: int, idempotency_ttl_s: int,
                 recent_ttl_s: int) -> None:
        self.keys = Keys(prefix)
        self.idempotency_ttl_s = idempotency_ttl_s
        self.recent_ttl_s = recent_ttl_s
        timeout_s = timeout_ms / 1000
        # No client-side retries: a failing Redis must turn into a quick 503, not a slow one.
        self._pool = pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # The create path's two calls (admit, finish) go through the lean client (shared/resp.py).
        self.fast = RespClient(url, timeout_s, inflight_max=pool_size)

    async def admit(self, merchant_id: str, idem_key: str | None, fingerprint: str, rate_per_s: float,
                    burst: float, lock_ttl_ms: int, velocity: VelocityEvent | None = None) -> Admission:
        keys = [self.keys.rate(merchant_id), self.keys.idem(merchant_id, idem_key) if idem_key else "",
                self.keys.lock(merchant_id, idem_key) if idem_key else ""]
        args: list[str | int | float] = [rate_per_s, burst, lock_ttl_ms, fingerprint]
        since_key = [self.keys.keys_since(merchant_id)]
        try:
            if velocity is None:
                out = await self.fast.evalsha(_ADMIT_SCRIPT, keys + since_key, args)
            else:
                out = await self.fast.evalsha(_ADMIT_VELOCITY_SCRIPT,
                                              keys + script_keys(self.keys.prefix, velocity) + since_key,
                                              [*args, *script_args(velocity)])
        except RespError as e:
            raise SharedStateUnavailable(str(e)) from None
        kind = out[0].decode() if isinstance(out[0], bytes) else out[0]
        if kind == "ok":
            since = out[1].decode() if isinstance(out[1], bytes) else str(out[1])
            return Admission("ok", velocity=check_counters(out[2]) if velocity is not None else None,
                             keys_since_ms=int(since) if since else None)
        if kind == "cached":
            return _decode_cached(out[1], fingerprint)
        if kind == "limited":
            return Admission("rate_limited", retry_after_s=max(1, -(-int(out[1]) // 1000)))
        return Admission("in_flight")

    async def finish(self, merchant_id: str, idem_key: str | None, fingerprint: str, status: int, body: bytes,
                     payment_id: str | None, cache: bool) -> None:
        commands = []
        if idem_key is not None and cache:
            commands.append(pack(b"SET", self.keys.idem(merchant_id, idem_key),
                                 _cached_value(fingerprint, status, body), b"EX", self.idempotency_ttl_s))
        if payment_id is not None and 200 <= status < 300:
            commands.append(pack(b"SET", self.keys.recent(payment_id), merchant_id.encode() + b"\n" + body,
                                 b"EX", self.recent_ttl_s))
        if idem_key is not None:
            commands.append(pack(b"DEL", self.keys.lock(merchant_id, idem_key)))
        if commands:
            await self._fast_call(*commands)

    async def mark_keys_since(self, merchant_id: str, since_ms: int) -> int:
        """Marks since when Redis holds the merchant's keys, unless another process did first; returns
        the mark that holds."""
        key = self.keys.keys_since(merchant_id)
        _, got = await self._fast_call(pack(b"SET", key, since_ms, b"NX"), pack(b"GET", key))
        return int(got) if got is not None else since_ms

    async def release(self, merchant_id: str, idem_key: str) -> None:
        await self._fast_call(pack(b"DEL", self.keys.lock(merchant_id, idem_key)))

    async def _fast_call(self, *commands: bytes) -> list[Any]:
        """Commands of the create path, pipelined on the lean client; any failure or refusal raises
        `SharedStateUnavailable`."""
        try:
            replies = await self.fast.call(*commands)
        except RespError as e:
            raise SharedStateUnavailable(str(e)) from None
        refused = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if refused:
            raise SharedStateUnavailable(f"Redis refused a command: {refused[0]}")
        return replies

    async def recent_payment(self, payment_id: str) -> tuple[str, bytes] | None:
        try:
            raw = await self.redis.get(self.keys.recent(payment_id))
        except RedisError as e:
            raise SharedStateUnavailable(str(e)) from None
        if raw is None:
            return None
        merchant, body = (raw if isinstance(raw, bytes) else raw.encode()).split(b"\n", 1)
        return merchant.decode(), body

    async def close(self) -> None:
        await self.fast.close()
        await self.redis.aclose()
        await self._pool.disconnect()


class InMemorySharedState:
    """The same semantics in one process's memory: for unit tests only (nothing is shared)."""

    def __init__(self, idempotency_ttl_s: int = 86_400, recent_ttl_s: int = 3_600) -> None:
        self.values: dict[str, tuple[bytes, float]] = {}
        self.buckets: dict[str, tuple[float, float]] = {}
        self.keys = Keys("mem")
        self.idempotency_ttl_s = idempotency_ttl_s
        self.recent_ttl_s = recent_ttl_s
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise SharedStateUnavailable("in-memory shared state marked down")

    def _get(self, key: str) -> bytes | None:
        hit = self.values.get(key)
        if hit is None or hit[1] <= time.monotonic():
            self.values.pop(key, None)
            return None
        return hit[0]

    def _set(self, key: str, value: bytes, ttl_s: float) -> None:
        self.values[key] = (value, time.monotonic() + ttl_s)

    async def admit(self, merchant_id: str, idem_key: str | None, fingerprint: str, rate_per_s: float,
                    burst: float, lock_ttl_ms: int, velocity: VelocityEvent | None = None) -> Admission:
        # One process shares nothing: velocity stays in the fast path's own store (Admission.velocity None).
        self._check()
        if idem_key is not None and (cached := self._get(self.keys.idem(merchant_id, idem_key))) is not None:
            return _decode_cached(cached, fingerprint)
        now = time.monotonic()
        tokens, ts = self.buckets.get(merchant_id, (burst, now))
        tokens = min(burst, tokens + (now - ts) * rate_per_s)
        if tokens < 1:
            return Admission("rate_limited", retry_after_s=max(1, int((1 - tokens) / rate_per_s + 0.999)))
        self.buckets[merchant_id] = (tokens - 1, now)
        if idem_key is not None:
            lock = self.keys.lock(merchant_id, idem_key)
            if self._get(lock) is not None:
                return Admission("in_flight")
            self._set(lock, b"1", lock_ttl_ms / 1000)
        return Admission("ok", keys_since_ms=0)

    async def finish(self, merchant_id: str, idem_key: str | None, fingerprint: str, status: int, body: bytes,
                     payment_id: str | None, cache: bool) -> None:
        self._check()
        if idem_key is not None and cache:
            self._set(self.keys.idem(merchant_id, idem_key), _cached_value(fingerprint, status, body),
                      self.idempotency_ttl_s)
        if payment_id is not None and 200 <= status < 300:
            self._set(self.keys.recent(payment_id), merchant_id.encode() + b"\n" + body, self.recent_ttl_s)
        if idem_key is not None:
            self.values.pop(self.keys.lock(merchant_id, idem_key), None)

    async def mark_keys_since(self, merchant_id: str, since_ms: int) -> int:
        return since_ms

    async def release(self, merchant_id: str, idem_key: str) -> None:
        self._check()
        self.values.pop(self.keys.lock(merchant_id, idem_key), None)

    async def recent_payment(self, payment_id: str) -> tuple[str, bytes] | None:
        self._check()
        raw = self._get(self.keys.recent(payment_id))
        if raw is None:
            return None
        merchant, body = raw.split(b"\n", 1)
        return merchant.decode(), body

    def forget(self, payment_ids: list[str]) -> None:
        for pid in payment_ids:
            self.values.pop(self.keys.recent(pid), None)

    async def close(self) -> None:
        return None


def forget_recent(client: redis.Redis, prefix: str, payment_ids: list[str]) -> None:
    """Workers: the payments are in PostgreSQL now, so reads go there (best effort, keys expire anyway)."""
    if not payment_ids:
        return
    keys = Keys(prefix)
    try:
        client.delete(*(keys.recent(pid) for pid in payment_ids))
    except RedisError as e:
        log.warning("could not drop %d read-your-writes copies (they expire by themselves): %s",
                    len(payment_ids), e)


# -- risk updates over pub/sub ------------------------------------------------------------------------

# Called (on the subscriber thread) with every message published on the risk channel, decoded from
# JSON. The risk engine registers its loader here; until then the messages are only counted and logged.
RISK_HANDLERS: list[Callable[[object], None]] = []


class RiskSubscriber:
    """One thread per gateway process subscribed to the risk channel; it reconnects after a Redis outage
    (updates published while it was away are lost: publishers also store the current version)."""

    def __init__(self, url: str, channel: str, timeout_ms: int) -> None:
        self.url = url
        self.channel = channel
        self.timeout_s = timeout_ms / 1000
        self.received = 0
        self.last: object = None
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _deliver(self, data: bytes) -> None:
        try:
            message = msgspec.json.decode(data)
        except msgspec.DecodeError:
            log.warning("risk update on %s is not JSON; ignored", self.channel)
            return
        self.received += 1
        self.last = message
        log.info("risk update received on %s by pid %d (%d handlers)", self.channel, os.getpid(), len(RISK_HANDLERS))
        for handler in RISK_HANDLERS:
            try:
                handler(message)
            except Exception:
                log.exception("risk update handler failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=self.timeout_s, socket_timeout=None)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                self.subscribed.set()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is not None and msg.get("type") == "message":
                        self._deliver(msg["data"])
            except RedisError as e:
                self.subscribed.clear()
                log.warning("risk channel %s: %s; reconnecting", self.channel, e)
                self._stop.wait(RISK_RECONNECT_S)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except RedisError:
                    pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="risk-subscriber", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
