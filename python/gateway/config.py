"""One TOML config schema for the whole gateway, validated at start-up with clear errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]


class ConfigurationError(Exception):
    """A config file that cannot be used; the message names the file, the key and the reason."""


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


class WalConfig(_Section):
    fsync_interval_us: Annotated[int, Meta(ge=0, le=1_000_000)] = 200
    batch_records_max: Annotated[int, Meta(ge=1, le=100_000)] = 512
    segment_bytes_max: Annotated[int, Meta(ge=4096)] = 64 * 1024 * 1024
    pending_records_max: Annotated[int, Meta(ge=1, le=10_000_000)] = 65_536


class LimitsConfig(_Section):
    body_bytes_max: Annotated[int, Meta(ge=256, le=1_048_576)] = 16 * 1024
    amount_max: PositiveInt = 99_999_999
    description_chars_max: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    metadata_keys_max: Annotated[int, Meta(ge=0, le=1000)] = 50
    metadata_key_chars_max: Annotated[int, Meta(ge=1, le=1000)] = 40
    metadata_value_chars_max: Annotated[int, Meta(ge=1, le=100_000)] = 500
    idempotency_key_chars_max: Annotated[int, Meta(ge=1, le=255)] = 255


class IdempotencyConfig(_Section):
    ttl_s: Annotated[int, Meta(ge=60)] = 24 * 3600
    entries_max: Annotated[int, Meta(ge=1000, le=100_000_000)] = 1_000_000


class RateLimitConfig(_Section):
    per_s: PositiveFloat = 1000.0
    burst: Annotated[float, Meta(ge=1)] = 2000.0


class TailerConfig(_Section):
    batch_records_max: Annotated[int, Meta(ge=1, le=100_000)] = 1000


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


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
    durability: Literal["wal", "kafka"] = "wal"
    # Prefix of every Redis key and of the risk channel, so several gateways can share one Redis.
    redis_key_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9:_-]{1,64}$")] = "gw"
    risk_channel: Annotated[str, Meta(min_length=1, max_length=200)] = "gateway:risk"
    redis_pool_size: Annotated[int, Meta(ge=1, le=1000)] = 64
    redis_timeout_ms: Annotated[int, Meta(ge=1, le=60_000)] = 200
    database_pool_min: Annotated[int, Meta(ge=1, le=100)] = 1
    database_pool_max: Annotated[int, Meta(ge=1, le=100)] = 4
    database_timeout_ms: Annotated[int, Meta(ge=10, le=60_000)] = 5_000
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
    # "shared": the risk engine's velocity counters (card, e-mail, ip, device, customer, merchant over
    # 1 m / 1 h / 24 h) live in Redis, counted by every process in the admission script of a create.
    # "local": each process counts only the payments it handled (as in embedded mode).
    velocity: Literal["shared", "local"] = "shared"


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

    def fastpath_json(self, data_dir: Path) -> str:
        """The settings the Rust fast path takes, as the JSON its `Config` decodes."""
        return msgspec.json.encode(
            {
                "wal_dir": str(data_dir / "wal"),
                "fsync_interval_us": self.wal.fsync_interval_us,
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


_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _explain(path: str, err: msgspec.ValidationError) -> ConfigurationError:
    match = _AT.match(str(err))
    reason = match.group("reason") if match else str(err)
    key = (match.group("path") or "").lstrip(".") if match else ""
    unknown = re.search(r"unknown field `([^`]+)`", reason)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        reason = "unknown key (check the spelling against config/gateway.toml)"
    return ConfigurationError(f"{path}: {key or '<top level>'}: {reason}")


def parse(text: str, path: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{path}: not valid TOML: {e}") from None
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise _explain(path, e) from None


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigurationError(f"{p}: cannot read the config file: {e.strerror}") from None
    return parse(text, str(p))
