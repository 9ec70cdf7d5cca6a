"""Environment variables that override keys of the config file (tests, benchmarks and operators use
them; an empty value counts as unset)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.config.errors import ConfigurationError


def _on_off(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected on or off (also 1/0, true/false, yes/no)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("not a number") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


# Named in the API's refusal of a private endpoint URL.
ENV_ALLOW_PRIVATE_URLS = "GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS"
# Environment variables that override a key of the file (tests and benchmarks use them; an empty value
# counts as unset). The same list is in the header of config/gateway.toml.
ENV_OVERRIDES: tuple[tuple[str, str, str, Callable[[str], Any]], ...] = (
    ("GATEWAY_WORKER", "worker", "enabled", _on_off),
    ("GATEWAY_WORKER_INFLIGHT_MAX", "worker", "inflight_max", _int),
    ("GATEWAY_RECONCILE_INTERVAL_MS", "worker", "reconcile_interval_ms", _int),
    ("GATEWAY_WORKER_DB_CONNECTIONS", "worker", "db_connections", _int),
    ("GATEWAY_PSP_TIME_SCALE", "psp", "time_scale", _float),
    ("GATEWAY_PSPS", "psp", "psps", _names),
    ("GATEWAY_PSP_SEED", "psp", "seed", _int),
    ("GATEWAY_PSP_TIMEOUT_MS", "psp", "timeout_ms", _int),
    ("GATEWAY_PSP_URL", "psp", "url", str),
    ("GATEWAY_WEBHOOK_ATTEMPTS_MAX", "webhooks", "attempts_max", _int),
    ("GATEWAY_WEBHOOK_RETRY_BASE_MS", "webhooks", "retry_base_ms", _int),
    ("GATEWAY_WEBHOOK_RETRY_MAX_MS", "webhooks", "retry_max_ms", _int),
    ("GATEWAY_WEBHOOK_TIMEOUT_MS", "webhooks", "timeout_ms", _int),
    ("GATEWAY_WEBHOOK_CONCURRENCY", "webhooks", "concurrency", _int),
    ("GATEWAY_WEBHOOK_POLL_MS", "webhooks", "poll_ms", _int),
    (ENV_ALLOW_PRIVATE_URLS, "webhooks", "allow_private_urls", _on_off),
    ("GATEWAY_METRICS_CHECK_INTERVAL_MS", "metrics", "check_interval_ms", _int),
    ("GATEWAY_LEDGER_CHECK_INTERVAL_MS", "metrics", "ledger_check_interval_ms", _int),
    ("GATEWAY_LOG_FORMAT", "log", "format", str),
    ("GATEWAY_STRIPE_OUTCOME_WAIT_MS", "stripe", "outcome_wait_ms", _int),
)


def apply_env(raw: dict[str, Any], env: Mapping[str, str], path: str) -> dict[str, str]:
    """Writes the overrides found in `env` into the parsed file; returns {"section.key": variable}."""
    applied: dict[str, str] = {}
    for var, section, key, kind in ENV_OVERRIDES:
        text = env.get(var, "")
        if not text:
            continue
        dotted = f"{section}.{key}"
        try:
            value = kind(text)
        except ValueError as e:
            raise ConfigurationError(f"{path}: {dotted} (environment {var}={text!r}): {e}") from None
        table = raw.setdefault(section, {})
        if isinstance(table, dict):  # otherwise the strict conversion names the section as not a table
            table[key] = value
            applied[dotted] = var
    return applied
