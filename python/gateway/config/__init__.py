"""One TOML config schema for the whole gateway, validated at start-up with clear errors.

Every setting lives here, with its default and its range; config/gateway.toml documents each one.
`load()` parses a file strictly (unknown keys, wrong types, out-of-range values and inconsistent pairs
are refused), then applies the few environment overrides of `ENV_OVERRIDES` (tests and benchmarks use
them), and validates the result again: any error is a `ConfigurationError` naming the file, the key
(and the variable, for an override) and the reason. This package is the only place that reads those variables (`env.py` lists them).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.config.env import ENV_ALLOW_PRIVATE_URLS, ENV_OVERRIDES, apply_env
from gateway.config.errors import ConfigurationError

__all__ = ["ENV_ALLOW_PRIVATE_URLS", "ENV_OVERRIDES", "Config", "ConfigurationError", "load", "parse"]

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8080
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    data_dir: str = "data"
    mode: Literal["embedded", "cluster"] = "embedded"
    backlog: Annotated[int, Meta(ge=16, le=65535)] = 4096
    # Requests that wait for a group commit longer than this get 503 and may be retried with their key.
    durable_wait_ms_max: Annotated[int, Meta(ge=10, le=60_000)] = 5_000
    # granian's HTTP/1 edge: a client that has not sent its headers by then is disconnected (slow
    # loris), and the read buffer bounds the bytes of a request head (hyper needs at least 8192).
    header_read_timeout_ms: Annotated[int, Meta(ge=100, le=300_000)] = 30_000
    http1_buffer_bytes_max: Annotated[int, Meta(ge=8192, le=16 * 1024 * 1024)] = 8192 + 4096 * 100


class WalConfig(_Section):
    fsync_interval_us: Annotated[int, Meta(ge=0, le=1_000_000)] = 200
    batch_records_max: Annotated[int, Meta(ge=1, le=100_000)] = 512
    segment_bytes_max: Annotated[int, Meta(ge=4096)] = 64 * 1024 * 1024
    pending_records_max: Annotated[int, Meta(ge=1, le=10_000_000)] = 65_536
    # Sealed segments whose records are all materialised (embedded) or relayed (cluster) are removed
    # once their last write is older than this; 0 keeps every segment.
    retention_s: Annotated[int, Meta(ge=0, le=365 * 24 * 3600)] = 24 * 3600
    # Removed segments are moved here instead of deleted; empty: deleted.
    archive_dir: str = ""


class LimitsConfig(_Section):
    body_bytes_max: Annotated[int, Meta(ge=256, le=1_048_576)] = 16 * 1024
    amount_max: PositiveInt = 99_999_999
    description_chars_max: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    metadata_keys_max: Annotated[int, Meta(ge=0, le=1000)] = 50
    metadata_key_chars_max: Annotated[int, Meta(ge=1, le=1000)] = 40
    metadata_value_chars_max: Annotated[int, Meta(ge=1, le=100_000)] = 500
    idempotency_key_chars_max: Annotated[int, Meta(ge=1, le=255)] = 255
    # More header fields or header bytes than this: 431 with the error object. (Past 100 fields granian
    # answers 431 itself, with an empty body: hyper's fixed bound.)
    headers_count_max: Annotated[int, Meta(ge=8, le=100)] = 64
    headers_bytes_max: Annotated[int, Meta(ge=1024, le=1_048_576)] = 16 * 1024


FILTER_BLOCK_KEYS_MAX = 16_777_216
FILTER_BLOCKS_HEADROOM = 4


class IdempotencyConfig(_Section):
    ttl_s: Annotated[int, Meta(ge=60)] = 24 * 3600
    entries_max: Annotated[int, Meta(ge=1000, le=100_000_000)] = 1_000_000
    # Embedded mode: the key filter in front of the store's durable record of every key. Sized for
    # `filter_keys_per_s` keyed creates per second over `ttl_s` at `filter_false_positive_rate` (the
    # share of new keys that cost a store read), see docs/idempotency.md.
    filter_keys_per_s: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    filter_false_positive_rate: Annotated[float, Meta(gt=0, le=0.2)] = 0.01
    # Period of the filter's persistence and of WAL retention (recovery re-reads at most this much WAL
    # for the filter).
    maintenance_interval_ms: Annotated[int, Meta(ge=10, le=600_000)] = 5000

    def filter_shape(self) -> tuple[int, float, int]:
        """(keys per filter block, false-positive rate per block, blocks at most): a block holds at most
        an hour of keys, and a lookup asks every block of the TTL, so the total rate is split between
        them. Memory is bounded at FILTER_BLOCKS_HEADROOM times the sized blocks (then: store reads)."""
        block_keys = min(FILTER_BLOCK_KEYS_MAX, max(1000, self.filter_keys_per_s * 3600))
        blocks = max(-(-self.ttl_s // 3600), -(-self.filter_keys_per_s * self.ttl_s // block_keys))
        return block_keys, self.filter_false_positive_rate / blocks, FILTER_BLOCKS_HEADROOM * blocks + 2


class RateLimitConfig(_Section):
    per_s: PositiveFloat = 1000.0
    burst: Annotated[float, Meta(ge=1)] = 2000.0


class TailerConfig(_Section):
    batch_records_max: Annotated[int, Meta(ge=1, le=100_000)] = 1000


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one JSON object per line (time, level, logger, message, request_id); "text": plain lines.
    format: Literal["text", "json"] = "text"


class MetricsConfig(_Section):
    """The async path's metrics (docs/operations.md): what the worker reads from the store on an interval,
    and where a cluster `gateway worker` serves its /metrics."""

    # Store counts (pending_verification, oldest undelivered webhook, reconciliation discrepancies).
    check_interval_ms: Annotated[int, Meta(ge=100, le=3_600_000)] = 5_000
    # The ledger check scans every ledger line: on its own, longer interval.
    ledger_check_interval_ms: Annotated[int, Meta(ge=100, le=86_400_000)] = 30_000
    # Cluster `gateway worker`: serve /metrics on this port (0: not served; `--metrics-port` overrides).
    worker_port: Annotated[int, Meta(ge=0, le=65535)] = 0
    worker_host: str = "127.0.0.1"


class MerchantsConfig(_Section):
    """Merchants managed live (`gateway merchant ...`, `/v1/admin/merchants`)."""

    # After `rotate-key`, the old key keeps working this long (`--overlap-s` overrides per rotation).
    key_overlap_s: Annotated[int, Meta(ge=0, le=30 * 86_400)] = 86_400
    # Every gateway process re-reads merchant changes this often (changes take effect within it).
    refresh_ms: Annotated[int, Meta(ge=100, le=60_000)] = 1_000


class ClusterConfig(_Section):
    """Cluster mode (`server.mode = "cluster"`): the shared services and how the gateway uses them."""

    redis_url: str = "redis://127.0.0.1:16379/0"
    database_url: str = "postgresql://gateway:gateway@127.0.0.1:15432/gateway"
    # PostgreSQL schema holding the gateway's tables (one per environment, or per test run).
    database_schema: Annotated[str, Meta(pattern=r"^[a-z_][a-z0-9_]{0,62}$")] = "public"
    kafka_bootstrap: str = "127.0.0.1:19092"
    topic: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "payments"
    topic_partitions: Annotated[int, Meta(ge=1, le=1024)] = 6
    consumer_group: Annotated[str, Meta(min_length=1, max_length=200)] = "gateway-workers"
    # "wal": a 2xx waits for the local WAL fsync only; the relay ships the record to Kafka afterwards.
    # "kafka": a 2xx waits for the local fsync and then for the broker's acknowledgement (acks=all).
    # "replicated": a 2xx waits for the brokers' acknowledgement only (acks=all on a topic with
    # topic_replication_factor >= 3 and topic_min_insync_replicas >= 2); the local fsync runs behind.
    durability: Literal["wal", "kafka", "replicated"] = "wal"
    # Copies of each partition of the topic, and how many of them must hold a record before the
    # brokers acknowledge it (the topic's `min.insync.replicas`, set at every start). 1 and 1 for a
    # single broker; 3 and 2 for `replicated` (one broker may be lost without losing a write).
    topic_replication_factor: Annotated[int, Meta(ge=1, le=16)] = 1
    topic_min_insync_replicas: Annotated[int, Meta(ge=1, le=16)] = 1
    # Prefix of every Redis key and of the risk channel, so several gateways can share one Redis.
    redis_key_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9:_-]{1,64}$")] = "gw"
    risk_channel: Annotated[str, Meta(min_length=1, max_length=200)] = "gateway:risk"
    redis_pool_size: Annotated[int, Meta(ge=1, le=1000)] = 64
    # Sized for a loaded machine: at 200 ms, 0.8% of creates got 503 at 200/s with no fault.
    redis_timeout_ms: Annotated[int, Meta(ge=1, le=60_000)] = 1_000
    database_pool_min: Annotated[int, Meta(ge=1, le=100)] = 1
    database_pool_max: Annotated[int, Meta(ge=1, le=100)] = 4
    database_timeout_ms: Annotated[int, Meta(ge=10, le=60_000)] = 5_000
    # How long Kafka keeps the `payments` topic (its `retention.ms`, set at every start); backtests in
    # cluster mode read this window. At least the longest consumer outage to survive.
    topic_retention_ms: Annotated[int, Meta(ge=3_600_000, le=365 * 24 * 3_600_000)] = 7 * 24 * 3_600_000
    # Cached create responses and locks: replays within this window are served from Redis.
    idempotency_ttl_s: Annotated[int, Meta(ge=60, le=30 * 24 * 3600)] = 24 * 3600
    # Accepted payments are readable from Redis until a worker has written them to PostgreSQL.
    recent_ttl_s: Annotated[int, Meta(ge=10, le=7 * 24 * 3600)] = 3600
    relay_inflight_records_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    relay_batch_records_max: Annotated[int, Meta(ge=1, le=100_000)] = 1_000
    relay_linger_ms: Annotated[int, Meta(ge=0, le=1_000)] = 1
    # How long librdkafka keeps retrying one record before the relay rewinds to its checkpoint.
    relay_message_timeout_ms: Annotated[int, Meta(ge=1_000, le=3_600_000)] = 60_000
    relay_checkpoint_interval_ms: Annotated[int, Meta(ge=1, le=60_000)] = 100
    worker_batch_records_max: Annotated[int, Meta(ge=1, le=100_000)] = 500
    # A worker whose loop (or whose Kafka offset commits) made no progress this long is not ready; its
    # consumer is re-created, and at twice this long the process exits (70) for its supervisor.
    worker_stall_timeout_ms: Annotated[int, Meta(ge=1_000, le=600_000)] = 30_000
    # SIGTERM stops a worker within this bound (exit 75 if the orderly stop did not finish in it).
    worker_stop_timeout_ms: Annotated[int, Meta(ge=1_000, le=600_000)] = 20_000
    # "shared": the risk engine's velocity counters (card, e-mail, ip, device, customer, merchant over
    # 1 m / 1 h / 24 h) live in Redis, counted by every process in the admission script of a create.
    # "local": each process counts only the payments it handled (as in embedded mode).
    velocity: Literal["shared", "local"] = "shared"
    # Every gateway process measures the cluster's backlog (Kafka records the workers have not stored,
    # plus stored payments still `processing`) this often; at `[worker] backlog_max` creates answer 503.
    backlog_check_ms: Annotated[int, Meta(ge=100, le=60_000)] = 1_000


class RiskConfig(_Section):
    """The risk control plane: admin API key, model file, GeoIP table (see docs/risk.md)."""

    # The admin key (`Authorization: Bearer ak_...`) is read from this environment variable at start-up,
    # or configured as the hex SHA-256 of the key; either matches. Neither set: the admin API answers 401.
    admin_key_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")] = "GATEWAY_ADMIN_KEY"
    admin_key_sha256: Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?$")] = ""
    # XGBoost model.json loaded at start and by `POST /v1/admin/model/reload`; empty: the shipped model.
    model_path: str = ""
    # Extra `cidr,country` lines for :ip_country: beside the built-in documentation ranges; empty: none.
    geoip_file: str = ""
    # Velocity keys tracked per dimension (card, email, ip, device, customer, merchant) by the live
    # engine, about 2.4 KB each; past it the least recently seen keys are dropped.
    velocity_keys_per_dimension_max: Annotated[int, Meta(ge=1024, le=16_777_216)] = 16_384
    # Velocity keys per dimension of the backtest engine.
    backtest_keys_per_dimension_max: Annotated[int, Meta(ge=1024, le=16_777_216)] = 16_384
    # WAL records one backtest replays at most (the most recent ones are not cut: the replay stops).
    backtest_records_max: Annotated[int, Meta(ge=1, le=100_000_000)] = 1_000_000


class WorkerConfig(_Section):
    """The payment worker: embedded mode's child process, or each `gateway worker` in cluster mode."""

    # false: no payment worker (request-path benchmarks only; payments stay `processing`; a cluster
    # `gateway worker` then only writes the Kafka records to PostgreSQL).
    enabled: bool = True
    inflight_max: Annotated[int, Meta(ge=1, le=10_000)] = 1024  # payments and operations at once
    # Period of the scan that finds payments and operations left unfinished (crash, timeout).
    reconcile_interval_ms: Annotated[int, Meta(ge=10, le=3_600_000)] = 1000
    # Cluster workers: PostgreSQL connections (and threads) of the payment path.
    db_connections: Annotated[int, Meta(ge=1, le=100)] = 8
    # Group commit of the worker's store calls (processing/batching.py): at most this many loads,
    # intents or outcomes go out as one store call (one transaction) ...
    batch_records_max: Annotated[int, Meta(ge=1, le=1000)] = 256
    # ... and a batch waits at most this long for more (0: only for what is ready on the event loop).
    batch_linger_ms: Annotated[float, Meta(ge=0, le=100)] = 0.0
    # Batch step (processing/batch.py): answers within this long of a batch's first join its apply.
    wave_linger_ms: Annotated[float, Meta(ge=0, le=100)] = 5.0
    # Payments acknowledged and not finished yet at most; at the bound a create answers 503
    # `backlog_full` with Retry-After. Embedded mode: not stored, queued or in progress in the worker.
    # Cluster mode: Kafka records not stored by the workers plus stored payments still `processing`,
    # measured every `[cluster] backlog_check_ms` (runtime/backlog.py).
    backlog_max: Annotated[int, Meta(ge=100, le=10_000_000)] = 200_000


class PSPProfileConfig(_Section):
    """Overrides of one simulated PSP's profile (`[psp.profiles.<name>]`, psp_sim/profiles.py); a key
    left out keeps the profile's own value. Lets a benchmark simulate a bigger or slower PSP."""

    # Concurrent requests the PSP accepts; its errors start at 80% of it.
    capacity_inflight_max: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    # Median latency of a call and its jitter (before [psp] time_scale).
    latency_ms_base: Annotated[float, Meta(ge=0, le=600_000)] | None = None
    latency_ms_jitter: Annotated[float, Meta(ge=0, le=600_000)] | None = None
    # Spontaneous failures, independent of load: errors (not processed) and timeouts (unknown).
    error_rate: Annotated[float, Meta(ge=0, le=1)] | None = None
    timeout_rate: Annotated[float, Meta(ge=0, le=1)] | None = None


PSP_URL_CHARS_MAX = 2048
# The simulator's profiles (psp_sim/profiles.py DEFAULT_PROFILES; a unit test keeps the two equal). Named
# here so that the schema needs nothing from the simulator.
PSP_PROFILE_NAMES = ("psp_a", "psp_b", "psp_c")


class PSPConfig(_Section):
    """The PSPs the workers route between: simulated in the worker process, or one `gateway psp-sim`."""

    # Multiplies every simulated PSP duration (tests use 0.01).
    time_scale: Annotated[float, Meta(ge=0, le=1000)] = 1.0
    # Simulator profiles to route between (psp_a, psp_b, psp_c), each at most once.
    psps: Annotated[tuple[str, ...], Meta(min_length=1, max_length=16)] = PSP_PROFILE_NAMES
    # Seed of the simulators' random outcomes.
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    # A PSP call that takes longer counts as a timeout (the payment is resolved by a status query).
    timeout_ms: Annotated[int, Meta(ge=1, le=600_000)] = 10_000
    # Base URL of a simulator served by `gateway psp-sim`; empty: simulators inside the worker process.
    url: Annotated[str, Meta(pattern=r"^(https?://\S+)?$", max_length=PSP_URL_CHARS_MAX)] = ""
    profiles: dict[str, PSPProfileConfig] = {}
    # The share of each PSP's capacity one worker may use at once (its bulkhead, psp/bulkhead.py); the
    # simulated PSPs answer with errors above 0.8 of their capacity.
    inflight_share_max: Annotated[float, Meta(gt=0, le=1)] = 0.75


class BreakerSection(_Section):
    """One circuit breaker per PSP (psp/breaker.py `BreakerConfig`, same field names)."""

    # Opens when, over the last `window_calls` calls (at least `calls_min`), the failure ratio reaches
    # `failure_ratio_threshold`, or after `consecutive_failures_max` failures in a row.
    window_calls: Annotated[int, Meta(ge=1, le=10_000)] = 20
    calls_min: Annotated[int, Meta(ge=1, le=10_000)] = 10
    failure_ratio_threshold: Annotated[float, Meta(gt=0, le=1)] = 0.5
    consecutive_failures_max: Annotated[int, Meta(ge=1, le=10_000)] = 5
    # Open this long, then half-open: `half_open_probes_max` calls go through.
    cooldown_s: Annotated[float, Meta(ge=0, le=86_400)] = 30.0
    half_open_probes_max: Annotated[int, Meta(ge=1, le=1000)] = 1


class RetrySection(_Section):
    """The retry policy of one payment (psp/routing.py `RetryPolicy`, same field names)."""

    attempts_max: Annotated[int, Meta(ge=1, le=16)] = 4
    backoff_ms_base: Annotated[float, Meta(ge=0, le=600_000)] = 100.0
    backoff_ms_max: Annotated[float, Meta(ge=0, le=600_000)] = 5_000.0
    multiplier: Annotated[float, Meta(ge=1, le=100)] = 2.0
    soft_decline_retries_max: Annotated[int, Meta(ge=0, le=16)] = 1


class WeightsSection(_Section):
    """PSP score weights (psp/routing.py `ScoreWeights`, same field names)."""

    success_points: Annotated[float, Meta(ge=0, le=1e6)] = 100.0
    latency_points_per_ms: Annotated[float, Meta(ge=0, le=1e6)] = 0.02
    cost_points_per_bps: Annotated[float, Meta(ge=0, le=1e6)] = 0.02
    prior_success_rate: Annotated[float, Meta(ge=0, le=1)] = 0.95
    prior_weight: Annotated[float, Meta(gt=0, le=1e6)] = 5.0


class RouterConfig(_Section):
    # Recent calls per PSP that its health rate and median latency are computed from.
    window_calls: Annotated[int, Meta(ge=1, le=10_000)] = 100
    breaker: BreakerSection = msgspec.field(default_factory=BreakerSection)
    retry: RetrySection = msgspec.field(default_factory=RetrySection)
    weights: WeightsSection = msgspec.field(default_factory=WeightsSection)


class WebhooksConfig(_Section):
    """The webhook dispatcher beside every worker (docs/webhooks.md); same names as `WebhookSettings`."""

    attempts_max: Annotated[int, Meta(ge=1, le=50)] = 12
    retry_base_ms: Annotated[int, Meta(ge=1, le=86_400_000)] = 5_000
    retry_max_ms: Annotated[int, Meta(ge=1, le=86_400_000)] = 3_600_000
    timeout_ms: Annotated[int, Meta(ge=100, le=60_000)] = 10_000
    concurrency: Annotated[int, Meta(ge=1, le=1000)] = 32
    poll_ms: Annotated[int, Meta(ge=10, le=60_000)] = 200
    batch_max: Annotated[int, Meta(ge=1, le=1000)] = 100
    allow_private_urls: bool = False


class StripeConfig(_Section):
    """The Stripe-compatible surface (api/stripe/, docs/stripe-compatibility.md)."""

    # A confirm, capture, cancel or refund waits this long for the worker's outcome, as Stripe answers
    # with the final status (`succeeded`, `requires_capture`, ...); past it the answer shows `processing`.
    # 0: answer as soon as the request is durable.
    outcome_wait_ms: Annotated[int, Meta(ge=0, le=10_000)] = 5_000
    # Base URL of the 3-D Secure test page in `next_action.redirect_to_url.url`; empty: the address the
    # request was sent to (its Host header).
    public_url: Annotated[str, Meta(pattern=r"^(https?://[^\s/]+)?$", max_length=256)] = ""


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    wal: WalConfig = msgspec.field(default_factory=WalConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    idempotency: IdempotencyConfig = msgspec.field(default_factory=IdempotencyConfig)
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    tailer: TailerConfig = msgspec.field(default_factory=TailerConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    risk: RiskConfig = msgspec.field(default_factory=RiskConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    psp: PSPConfig = msgspec.field(default_factory=PSPConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    stripe: StripeConfig = msgspec.field(default_factory=StripeConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    merchants: MerchantsConfig = msgspec.field(default_factory=MerchantsConfig)

    def fastpath_json(self, data_dir: Path, recover_after_lsn: int = 0, key_filter: bool = False,
                      fsync_behind: bool = False) -> str:
        """The settings the Rust fast path takes, as the JSON its `Config` decodes. `recover_after_lsn`:
        the store's checkpoint; `key_filter`: the memory table is a cache in front of the store's
        record of every key (embedded mode), with its filter persisted in data_dir/idempotency;
        `fsync_behind`: the WAL's fsync runs on its own thread behind the writes (durability "replicated")."""
        block_keys, block_rate, blocks_max = self.idempotency.filter_shape()
        return msgspec.json.encode(
            {
                "idempotency_filter_dir": str(data_dir / "idempotency") if key_filter else "",
                "idempotency_filter_false_positive_rate": block_rate,
                "idempotency_filter_block_keys": block_keys,
                "idempotency_filter_blocks_max": blocks_max,
                "recover_after_lsn": recover_after_lsn,
                "wal_retention_s": self.wal.retention_s,
                "wal_archive_dir": self.wal.archive_dir,
                "maintenance_interval_ms": self.idempotency.maintenance_interval_ms,
                "wal_dir": str(data_dir / "wal"),
                "fsync_interval_us": self.wal.fsync_interval_us,
                "fsync_behind": fsync_behind,
                "batch_records_max": self.wal.batch_records_max,
                "segment_bytes_max": self.wal.segment_bytes_max,
                "pending_records_max": self.wal.pending_records_max,
                "body_bytes_max": self.limits.body_bytes_max,
                "amount_max": self.limits.amount_max,
                "description_chars_max": self.limits.description_chars_max,
                "metadata_keys_max": self.limits.metadata_keys_max,
                "metadata_key_chars_max": self.limits.metadata_key_chars_max,
                "metadata_value_chars_max": self.limits.metadata_value_chars_max,
                "idempotency_key_chars_max": self.limits.idempotency_key_chars_max,
                "idempotency_ttl_s": self.idempotency.ttl_s,
                "idempotency_entries_max": self.idempotency.entries_max,
                "rate_limit_per_s": self.rate_limit.per_s,
                "rate_limit_burst": self.rate_limit.burst,
                "risk_velocity_keys_per_dimension_max": self.risk.velocity_keys_per_dimension_max,
            }
        ).decode()


def _inconsistency(cfg: Config) -> tuple[str, str] | None:
    """The first (key, reason) that a per-key range cannot express: names, and pairs of keys."""
    psp = cfg.psp
    for name in psp.psps:
        if name not in PSP_PROFILE_NAMES:
            return "psp.psps", f"unknown PSP profile {name!r}; known: {', '.join(PSP_PROFILE_NAMES)}"
    if len(set(psp.psps)) != len(psp.psps):
        return "psp.psps", "names a PSP more than once"
    for name in psp.profiles:
        if name not in psp.psps:
            return f"psp.profiles.{name}", f"{name!r} is not one of psp.psps ({', '.join(psp.psps)})"
    b, r, w = cfg.router.breaker, cfg.router.retry, cfg.webhooks
    if b.calls_min > b.window_calls:
        return "router.breaker.calls_min", f"must be at most router.breaker.window_calls ({b.window_calls})"
    if r.backoff_ms_max < r.backoff_ms_base:
        return (
            "router.retry.backoff_ms_max",
            f"must be at least router.retry.backoff_ms_base ({r.backoff_ms_base})",
        )
    if w.retry_max_ms < w.retry_base_ms:
        return "webhooks.retry_max_ms", f"must be at least webhooks.retry_base_ms ({w.retry_base_ms})"
    c = cfg.cluster
    if c.topic_min_insync_replicas > c.topic_replication_factor:
        return ("cluster.topic_min_insync_replicas",
                f"must be at most cluster.topic_replication_factor ({c.topic_replication_factor})")
    if c.durability == "replicated" and (c.topic_replication_factor < 3 or c.topic_min_insync_replicas < 2):
        needs = "\"replicated\" needs cluster.topic_replication_factor >= 3 and topic_min_insync_replicas >= 2"
        return "cluster.durability", f"{needs} (they are {c.topic_replication_factor} and {c.topic_min_insync_replicas})"
    return None


_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _named(key: str, applied: Mapping[str, str]) -> str:
    return f"{key} (environment {applied[key]})" if key in applied else key


def _explain(
    path: str, err: msgspec.ValidationError, applied: Mapping[str, str], prefix: str = ""
) -> ConfigurationError:
    match = _AT.match(str(err))
    reason = match.group("reason") if match else str(err)
    key = (match.group("path") or "").lstrip(".") if match else ""
    unknown = re.search(r"unknown field `([^`]+)`", reason)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        reason = "unknown key (check the spelling against config/gateway.toml)"
    key = ".".join(k for k in (prefix, key) if k)
    return ConfigurationError(f"{path}: {_named(key, applied) if key else '<top level>'}: {reason}")


def _profile_error(raw: dict[str, Any], path: str) -> ConfigurationError | None:
    """msgspec calls a table of `psp.profiles` `[...]`: the error of the profile at fault, with its name."""
    psp = raw.get("psp")
    profiles = psp.get("profiles") if isinstance(psp, dict) else None
    for name, table in profiles.items() if isinstance(profiles, dict) else ():
        try:
            msgspec.convert(table, PSPProfileConfig)
        except msgspec.ValidationError as e:
            return _explain(path, e, {}, prefix=f"psp.profiles.{name}")
    return None


def _build(raw: dict[str, Any], path: str, env: Mapping[str, str]) -> Config:
    applied = apply_env(raw, env, path)
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise (_profile_error(raw, path) or _explain(path, e, applied)) from None
    bad = _inconsistency(cfg)
    if bad is not None:
        raise ConfigurationError(f"{path}: {_named(bad[0], applied)}: {bad[1]}")
    return cfg


def parse(text: str, path: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """The config in `text`, with the overrides of `env` (none by default: the text alone)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{path}: not valid TOML: {e}") from None
    return _build(raw, path, env or {})


def load(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """The config file at `path` (None: the defaults) with the overrides of `env` (default: os.environ)."""
    e = os.environ if env is None else env
    if path is None:
        return _build({}, "<defaults>", e)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigurationError(f"{p}: cannot read the config file: {err.strerror}") from None
    return parse(text, str(p), e)
