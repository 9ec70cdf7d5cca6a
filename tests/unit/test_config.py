"""The config schema of the worker, PSP, router and webhook settings: every value is checked on load with
an error naming the file, the key (and the variable, for an environment override) and the reason; the
defaults are today's; the worker takes its router, breakers, retry policy and dispatcher from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gateway import config
from gateway.config import Config, ConfigurationError
from gateway.domain.events import WebhookSettings
from gateway.processing.webhooks import webhook_settings
from gateway.processing.worker import Worker, WorkerSettings
from gateway.psp.breaker import BreakerConfig
from gateway.psp.routing import RetryPolicy, ScoreWeights
from gateway.psp_sim import DEFAULT_PROFILES
from gateway.store.sqlite import SqliteStore
from msgspec.structs import asdict
from support import REPO, run_cli

SHIPPED = [REPO / "config" / "gateway.toml", REPO / "config" / "cluster.toml"]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_files_pass_config_check(path: Path) -> None:
    r = subprocess.run([str(Path(sys.executable).parent / "gateway"), "config", "check", str(path)],
                       capture_output=True, text=True, timeout=60, env=_clean_env(), check=False)
    assert r.returncode == 0, r.stderr
    assert f"{path}: ok" in r.stdout


def test_shipped_gateway_toml_shows_exactly_the_defaults() -> None:
    assert config.load(SHIPPED[0], {}) == Config()


def test_the_schema_knows_exactly_the_simulator_profiles() -> None:
    assert config.PSP_PROFILE_NAMES == tuple(DEFAULT_PROFILES)


def test_new_sections_default_to_todays_settings() -> None:
    cfg = Config()
    assert webhook_settings(cfg.webhooks) == WebhookSettings()
    assert BreakerConfig(**asdict(cfg.router.breaker)) == BreakerConfig()
    assert RetryPolicy(**asdict(cfg.router.retry)) == RetryPolicy()
    assert ScoreWeights(**asdict(cfg.router.weights)) == ScoreWeights()
    assert cfg.router.window_calls == 100
    assert WorkerSettings.from_config(cfg) == WorkerSettings()
    assert cfg.worker.enabled and cfg.psp.url == "" and cfg.psp.psps == ("psp_a", "psp_b", "psp_c")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[worker]\ninflight_max = 0\n", "worker.inflight_max", ">= 1"),
        ("[worker]\nenabled = \"off\"\n", "worker.enabled", "Expected `bool`"),
        ("[worker]\nreconcile_interval_ms = 5\n", "worker.reconcile_interval_ms", ">= 10"),
        ("[worker]\ndb_connections = 101\n", "worker.db_connections", "<= 100"),
        ("[worker]\nthreads = 4\n", "worker.threads", "unknown key"),
        ("[psp]\ntime_scale = -0.5\n", "psp.time_scale", ">= 0"),
        ("[psp]\npsps = [\"psp_a\", \"psp_z\"]\n", "psp.psps", "unknown PSP profile 'psp_z'"),
        ("[psp]\npsps = [\"psp_a\", \"psp_a\"]\n", "psp.psps", "more than once"),
        ("[psp]\npsps = []\n", "psp.psps", "length >= 1"),
        ("[psp]\ntimeout_ms = 0\n", "psp.timeout_ms", ">= 1"),
        ("[psp]\nurl = \"ftp://psp.example\"\n", "psp.url", "matching regex"),
        ("[psp]\npsps = [\"psp_a\"]\n[psp.profiles.psp_c]\n", "psp.profiles.psp_c", "not one of psp.psps"),
        ("[psp.profiles.psp_a]\ncapacity = 5\n", "psp.profiles.psp_a.capacity", "unknown key"),
        ("[router]\nwindow_calls = 0\n", "router.window_calls", ">= 1"),
        ("[router.breaker]\nfailure_ratio_threshold = 1.5\n", "router.breaker.failure_ratio_threshold", "<= 1"),
        ("[router.breaker]\ncalls_min = 30\n", "router.breaker.calls_min", "at most router.breaker.window_calls"),
        ("[router.breaker]\nhalf_open_probes_max = 0\n", "router.breaker.half_open_probes_max", ">= 1"),
        ("[router.retry]\nattempts_max = 17\n", "router.retry.attempts_max", "<= 16"),
        ("[router.retry]\nbackoff_ms_base = 900.0\nbackoff_ms_max = 500.0\n", "router.retry.backoff_ms_max",
         "at least router.retry.backoff_ms_base"),
        ("[router.retry]\nmultiplier = 0.5\n", "router.retry.multiplier", ">= 1"),
        ("[router.weights]\nprior_weight = 0.0\n", "router.weights.prior_weight", "> 0"),
        ("[webhooks]\nattempts_max = 51\n", "webhooks.attempts_max", "<= 50"),
        ("[webhooks]\nretry_base_ms = 2000\nretry_max_ms = 1000\n", "webhooks.retry_max_ms",
         "at least webhooks.retry_base_ms"),
        ("[webhooks]\ntimeout_ms = 99\n", "webhooks.timeout_ms", ">= 100"),
        ("[webhooks]\nallow_private_urls = 1\n", "webhooks.allow_private_urls", "Expected `bool`"),
        ("[cluster]\ndurability = \"quorum\"\n", "cluster.durability", "Invalid enum value 'quorum'"),
        ("[cluster]\ndurability = \"replicated\"\n", "cluster.durability",
         "needs cluster.topic_replication_factor >= 3 and topic_min_insync_replicas >= 2 (they are 1 and 1)"),
        ("[cluster]\ndurability = \"replicated\"\ntopic_replication_factor = 3\n", "cluster.durability",
         "(they are 3 and 1)"),
        ("[cluster]\ntopic_min_insync_replicas = 2\n", "cluster.topic_min_insync_replicas",
         "at most cluster.topic_replication_factor (1)"),
        ("[cluster]\ntopic_replication_factor = 0\n", "cluster.topic_replication_factor", ">= 1"),
    ],
)
def test_a_bad_value_in_a_new_section_names_the_file_the_key_and_the_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        config.parse(text, "bad.toml")
    message = str(e.value)
    assert message.startswith(f"bad.toml: {key}"), message
    assert reason in message, message


def test_replicated_durability_takes_three_copies_and_two_in_sync() -> None:
    cfg = config.parse("[cluster]\ndurability = \"replicated\"\ntopic_replication_factor = 3\n"
                       "topic_min_insync_replicas = 2\n", "ok.toml")
    assert (cfg.cluster.durability, cfg.cluster.topic_replication_factor, cfg.cluster.topic_min_insync_replicas) == (
        "replicated", 3, 2)
    assert '"fsync_behind": true' not in cfg.fastpath_json(Path("d"))
    assert '"fsync_behind":true' in cfg.fastpath_json(Path("d"), fsync_behind=True)


def test_config_check_prints_the_error_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[router.retry]\nattempts_max = 0\n")
    for args in (("config", "check", str(bad)), ("config", "check", "--config", str(bad))):
        r = run_cli(*args, check=False)
        assert r.returncode == 2
        assert str(bad) in r.stderr and "router.retry.attempts_max" in r.stderr and ">= 1" in r.stderr, r.stderr


def test_environment_overrides_apply_over_the_file_and_empty_means_unset() -> None:
    text = "[psp]\ntime_scale = 0.5\npsps = [\"psp_a\"]\n[worker]\ninflight_max = 16\n"
    cfg = config.parse(text, "f.toml", {"GATEWAY_PSP_TIME_SCALE": "0.01", "GATEWAY_PSPS": "psp_b, psp_c",
                                        "GATEWAY_WORKER": "off", "GATEWAY_WORKER_INFLIGHT_MAX": "",
                                        "GATEWAY_PSP_URL": "http://127.0.0.1:8700",
                                        "GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1"})
    assert cfg.psp.time_scale == 0.01 and cfg.psp.psps == ("psp_b", "psp_c")
    assert cfg.worker.enabled is False and cfg.worker.inflight_max == 16
    assert cfg.psp.url == "http://127.0.0.1:8700" and cfg.webhooks.allow_private_urls is True
    assert config.parse(text, "f.toml").psp.time_scale == 0.5  # parse() alone reads no environment


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"GATEWAY_WEBHOOK_ATTEMPTS_MAX": "0"}, "webhooks.attempts_max (environment GATEWAY_WEBHOOK_ATTEMPTS_MAX)"),
        ({"GATEWAY_PSP_TIMEOUT_MS": "soon"}, "psp.timeout_ms (environment GATEWAY_PSP_TIMEOUT_MS='soon'): not an"),
        ({"GATEWAY_WORKER": "maybe"}, "worker.enabled (environment GATEWAY_WORKER='maybe'): expected on or off"),
        ({"GATEWAY_PSPS": "psp_x"}, "psp.psps (environment GATEWAY_PSPS): unknown PSP profile 'psp_x'"),
        ({"GATEWAY_WEBHOOK_RETRY_MAX_MS": "10"}, "webhooks.retry_max_ms (environment GATEWAY_WEBHOOK_RETRY_MAX_MS)"),
        ({"GATEWAY_PSP_URL": "psp:8700"}, "psp.url (environment GATEWAY_PSP_URL)"),
    ],
)
def test_a_bad_environment_override_names_the_variable_and_the_key(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        config.load(None, env)
    assert str(e.value).startswith("<defaults>: ") and fragment in str(e.value), str(e.value)


def test_validation_holds_under_python_dash_o() -> None:
    code = ("from gateway import config\n"
            "try:\n    config.load(None, {'GATEWAY_WORKER_INFLIGHT_MAX': '0'})\n"
            "except config.ConfigurationError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60,
                       env=_clean_env(), check=True)
    assert "refused: <defaults>: worker.inflight_max" in r.stdout, r.stdout + r.stderr


def test_the_worker_takes_router_breaker_retry_and_webhook_settings_from_the_config(tmp_path: Path) -> None:
    text = ("[psp]\npsps = [\"psp_b\"]\ntime_scale = 0.01\n[router]\nwindow_calls = 7\n"
            "[router.breaker]\nconsecutive_failures_max = 3\ncooldown_s = 2.5\n"
            "[router.retry]\nattempts_max = 2\nsoft_decline_retries_max = 0\n"
            "[router.weights]\ncost_points_per_bps = 0.5\n[webhooks]\nattempts_max = 3\npoll_ms = 50\n")
    store = SqliteStore(tmp_path / "gateway.db")
    store.migrate()
    try:
        worker = Worker(store, WorkerSettings.from_config(config.parse(text)))
        assert list(worker.router.routes) == ["psp_b"] and list(worker.clients) == ["psp_b"]
        breaker = worker.router.breakers["psp_b"].config
        assert breaker.consecutive_failures_max == 3 and breaker.cooldown_s == 2.5 and breaker.window_calls == 20
        assert worker.router.weights.cost_points_per_bps == 0.5
        assert worker.policy == RetryPolicy(attempts_max=2, soft_decline_retries_max=0)
        assert worker.settings.webhooks.attempts_max == 3 and worker.settings.webhooks.poll_ms == 50
    finally:
        store.close()


def test_psp_sim_refuses_a_bad_flag_before_serving() -> None:
    r = run_cli("psp-sim", "--time-scale", "-1", check=False)
    assert r.returncode == 2 and "time_scale" in r.stderr, r.stderr
