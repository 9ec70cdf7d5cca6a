"""Velocity counters shared by the gateway processes of a cluster, on Redis (`cluster.velocity = "shared"`).

In embedded mode (and with `velocity = "local"`) the risk engine counts velocity in the Rust extension's
memory (rust/risk/src/velocity.rs), so with several processes a card's payments are split between
them. Here one Lua function applies a payment to the windows of all its dimensions at once and returns
the features after the update; the fast path then decides with those features instead of its own store
(`FastPath.create_payment(..., velocity=counters)`).

- **One round trip.** `VELOCITY_LUA` defines `velocity(k, a)`; the admission script of
  shared/redis_state.py calls it once the request is admitted (cached response? token bucket, `SET NX`
  lock), so a create still costs one script before the Rust call, and a refused request (replay,
  conflict, rate limit) counts nothing, as in embedded mode where those checks precede the risk stage.
- **Same semantics as velocity.rs** (proved by tests/contract/test_velocity_contract.py): per key and
  window a ring of buckets (`bucket_ms` x `buckets`) with running totals; an event counts while it is
  younger than `window - bucket_ms` and never once it is `window` old; late events go to the newest
  bucket. Distinct members (cards per device, ...) keep the 64 most recently seen, each counted while
  `now - last_seen < window`.
- **No raw values in Redis.** The fast path hands out each key as a 64-bit SHA-256 prefix, domain
  separated per dimension (`FastPath.velocity_event`); amounts are USD cents.
- **Bounded memory.** Every key expires `KEY_TTL_MS` (25 h) after its last event, past the longest
  window; a key holds at most 2 x 138 bucket fields, a distinct set at most 64 members.
- **One clock.** The script reads Redis `TIME`, so processes on several hosts share the windows' clock
  (tests pass `now_ms` explicitly to replay sequences).

Hash of a dimension `d`, key `h`: `{prefix}:vel:{d}:{h}`; its distinct set of pair `p`: that key plus
`:d{p}`. The keys of one payment do not share a hash tag: on a Redis Cluster the script would need one
call per shard (not done; see README, "Cluster mode").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from gateway._fastpath import VELOCITY_FEATURES

if TYPE_CHECKING:
    import redis

# Same order as DIMS and DISTINCT in rust/risk/src/attrs.rs.
DIMS = ("card", "email", "ip", "device", "customer", "merchant")
DISTINCT_PAIRS = ((3, 0), (1, 0), (2, 0), (4, 0), (0, 1), (0, 3))  # (owner dimension, member dimension)
KEY_HASH_HEX_LEN = 16
# Longest window (24 h) plus an hour: an expired key could only have held events out of every window.
KEY_TTL_MS = 25 * 3_600_000
CENTS_MAX = 1 << 53
_HEX_DIGITS = "0123456789abcdef"

# `velocity(k, a)`: KEYS[k+1..k+6] the hash of each dimension ('' when the payment has none),
# KEYS[k+7..k+12] the distinct set of each pair ('' when its owner dimension is absent); ARGV[a+1] now
# in ms ('' for Redis TIME), ARGV[a+2] USD cents, ARGV[a+3] key TTL in ms, ARGV[a+4..a+9] the member
# hash of each dimension ('' when absent). Returns 54 integers: per dimension and window the count and
# the cents, then per pair and window the distinct count; -1 where the dimension is absent.
VELOCITY_LUA = """
local VEL_WINDOWS = {{2000, 30}, {60000, 60}, {1800000, 48}}
local VEL_WINDOW_MS = {60000, 3600000, 86400000}
local VEL_DISTINCT = {{4, 1}, {2, 1}, {3, 1}, {5, 1}, {1, 2}, {1, 4}}
local VEL_MEMBERS_MAX = 64
local VEL_REFRESH_MS = 3600000
-- The distinct pairs (indices into VEL_DISTINCT) each dimension owns.
local VEL_OWNED = {{5, 6}, {2}, {3}, {1}, {4}, {}}

-- Hash fields are numbers (Redis formats them in C, cheaper than Lua strings): newest bucket of window
-- w is field w, its count 10 + w, its cents 20 + w, the last TTL refresh 30; slot i of window w holds
-- its count in w * 1000 + i and its cents in w * 1000 + 500 + i; the last TTL refresh of the distinct set
-- of pair p (owned by this dimension) is field 40 + p.
local function velocity(k, a)
    local now = tonumber(ARGV[a + 1])
    if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    local cents = tonumber(ARGV[a + 2])
    local ttl = tonumber(ARGV[a + 3])
    local out = {}
    local refresh_set = {}
    for d = 1, 6 do
        local key = KEYS[k + d]
        if key == '' then
            for _ = 1, 6 do out[#out + 1] = -1 end
        else
            -- One read: the state of the three windows and the slot each event would normally land in.
            local s1 = math.floor(now / 2000) % 30
            local s2 = math.floor(now / 60000) % 60
            local s3 = math.floor(now / 1800000) % 48
            local owned = VEL_OWNED[d]
            local st = redis.call('HMGET', key, 1, 11, 21, 2, 12, 22, 3, 13, 23, 30,
                1000 + s1, 1500 + s1, 2000 + s2, 2500 + s2, 3000 + s3, 3500 + s3,
                40 + (owned[1] or 0), 40 + (owned[2] or 0))
            local set, drop = {}, {}
            for w = 1, 3 do
                local width, n = VEL_WINDOWS[w][1], VEL_WINDOWS[w][2]
                local base = w * 1000
                local newest = tonumber(st[3 * w - 2]) or 0
                local count = tonumber(st[3 * w - 1]) or 0
                local total = tonumber(st[3 * w]) or 0
                local bucket = math.floor(now / width)
                local slot_count, slot_cents = 0, 0
                if bucket > newest then
                    -- Move the window forward, dropping the buckets that left it from the totals.
                    if bucket - newest >= n or count == 0 then
                        if count ~= 0 then
                            for i = 0, n - 1 do
                                drop[#drop + 1] = base + i
                                drop[#drop + 1] = base + 500 + i
                            end
                        end
                        count = 0
                        total = 0
                    else
                        local f = {}
                        for b = newest + 1, bucket do
                            f[#f + 1] = base + b % n
                            f[#f + 1] = base + 500 + b % n
                        end
                        local v = redis.call('HMGET', key, unpack(f))
                        for i = 1, #v, 2 do
                            count = count - (tonumber(v[i]) or 0)
                            total = total - (tonumber(v[i + 1]) or 0)
                            drop[#drop + 1] = f[i]
                            drop[#drop + 1] = f[i + 1]
                        end
                    end
                    newest = bucket
                elseif bucket == newest then
                    slot_count = tonumber(st[9 + 2 * w]) or 0
                    slot_cents = tonumber(st[10 + 2 * w]) or 0
                else
                    -- A late event (time going backwards) goes to the newest bucket.
                    local v = redis.call('HMGET', key, base + newest % n, base + 500 + newest % n)
                    slot_count = tonumber(v[1]) or 0
                    slot_cents = tonumber(v[2]) or 0
                end
                count = count + 1
                total = total + cents
                local slot = newest % n
                set[#set + 1] = base + slot
                set[#set + 1] = slot_count + 1
                set[#set + 1] = base + 500 + slot
                set[#set + 1] = slot_cents + cents
                set[#set + 1] = w
                set[#set + 1] = newest
                set[#set + 1] = 10 + w
                set[#set + 1] = count
                set[#set + 1] = 20 + w
                set[#set + 1] = total
                out[#out + 1] = count
                out[#out + 1] = total
            end
            -- Expiries are pushed back at most once an hour (they have an hour of slack past 24 h): the
            -- hash's by any event, a distinct set's by an event that carries a member of it.
            local last = tonumber(st[10])
            local refresh = not last or now - last >= VEL_REFRESH_MS or now < last
            if refresh then
                set[#set + 1] = 30
                set[#set + 1] = now
            end
            for j, p in ipairs(owned) do
                local z = tonumber(st[16 + j])
                if ARGV[a + 3 + VEL_DISTINCT[p][2]] ~= ''
                        and (not z or now - z >= VEL_REFRESH_MS or now < z) then
                    set[#set + 1] = 40 + p
                    set[#set + 1] = now
                    refresh_set[p] = true
                end
            end
            if #drop > 0 then redis.call('HDEL', key, unpack(drop)) end
            redis.call('HSET', key, unpack(set))
            if refresh then redis.call('PEXPIRE', key, ttl) end
        end
    end
    for p = 1, 6 do
        local key = KEYS[k + 6 + p]
        if key == '' then
            for _ = 1, 3 do out[#out + 1] = -1 end
        else
            local member = ARGV[a + 3 + VEL_DISTINCT[p][2]]
            if member ~= '' then
                -- GT: a member seen again keeps its latest time; the answer is 1 for a new member only.
                if redis.call('ZADD', key, 'GT', now, member) == 1
                        and redis.call('ZCARD', key) > VEL_MEMBERS_MAX then
                    -- Keep the 64 most recently seen: drop the least recent, an older member before
                    -- the new one at equal times (the new member is dropped only if it is the oldest).
                    local low = redis.call('ZRANGE', key, 0, 1, 'WITHSCORES')
                    local victim = low[1]
                    if victim == member and low[4] == low[2] then victim = low[3] end
                    redis.call('ZREM', key, victim)
                end
                if refresh_set[p] then redis.call('PEXPIRE', key, ttl) end
            end
            for w = 1, 3 do
                out[#out + 1] = redis.call('ZCOUNT', key, now - VEL_WINDOW_MS[w] + 1, '+inf')
            end
        end
    end
    return out
end
"""

# The script on its own, for tests and benchmarks: the gateway calls `velocity` from the admission script.
STANDALONE_LUA = VELOCITY_LUA + "return velocity(0, 0)\n"


class VelocityEvent(msgspec.Struct, frozen=True):
    """What one payment contributes: USD cents and the key hash per dimension of `DIMS` (None: absent)."""

    cents: int
    keys: tuple[str | None, ...]

    @classmethod
    def from_fastpath(cls, raw: tuple[int, list[str | None]]) -> VelocityEvent:
        cents, keys = raw
        if not 0 <= cents <= CENTS_MAX:
            raise ValueError(f"velocity event cents {cents} outside 0..{CENTS_MAX}")
        if len(keys) != len(DIMS):
            raise ValueError(f"velocity event needs {len(DIMS)} keys, got {len(keys)}")
        for k in keys:
            if k is not None and (len(k) != KEY_HASH_HEX_LEN or k.strip(_HEX_DIGITS)):
                raise ValueError("velocity key hashes are 16 hex digits")
        return cls(cents, tuple(keys))


def script_keys(prefix: str, event: VelocityEvent) -> list[str]:
    """The 12 KEYS of `velocity`: the hash of each dimension, then the distinct set of each pair."""
    dims = [f"{prefix}:vel:{DIMS[d]}:{h}" if h is not None else "" for d, h in enumerate(event.keys)]
    pairs = [f"{dims[owner]}:d{p}" if dims[owner] else "" for p, (owner, _) in enumerate(DISTINCT_PAIRS)]
    return dims + pairs


def script_args(event: VelocityEvent, now_ms: int | None = None) -> list[str | int]:
    """The 9 ARGV of `velocity` (`now_ms` None: the script reads Redis TIME)."""
    return ["" if now_ms is None else now_ms, event.cents, KEY_TTL_MS, *(k or "" for k in event.keys)]


def check_counters(out: object) -> list[int]:
    """The script's answer, checked before it reaches the fast path."""
    if not isinstance(out, list) or len(out) != VELOCITY_FEATURES or not all(isinstance(v, int) for v in out):
        raise ValueError(f"the velocity script must return {VELOCITY_FEATURES} integers")
    return out


def apply_sync(client: redis.Redis, prefix: str, event: VelocityEvent, now_ms: int | None = None) -> list[int]:
    """Applies one event with a blocking client (tests, benchmarks); the counters after the update."""
    script = client.register_script(STANDALONE_LUA)
    return check_counters(script(keys=script_keys(prefix, event), args=script_args(event, now_ms)))
