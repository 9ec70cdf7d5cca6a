"""What one payment worker runs with, and the PSPs it routes between.

`WorkerSettings` comes from the validated config (`[worker]`, `[psp]`, `[router]`, `[webhooks]`;
`from_config`), so nothing here checks ranges again. `build_psps` makes the simulated PSPs (or the
clients of one `gateway psp-sim`), each behind its bulkhead (psp/bulkhead.py: at most
`[psp] inflight_share_max` of its capacity in flight from this worker), the router with its breakers,
and the retry policy.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field

from msgspec.structs import asdict

from gateway.config import Config, MetricsConfig, PSPConfig, PSPProfileConfig, RouterConfig, WorkerConfig
from gateway.domain.events import WebhookSettings
from gateway.processing.webhooks import webhook_settings
from gateway.psp.breaker import BreakerConfig
from gateway.psp.bulkhead import Bulkhead, CallObserver
from gateway.psp.client import HTTPPSPClient, PSPClient
from gateway.psp.routing import PSPRoute, RetryPolicy, Router, ScoreWeights
from gateway.psp_sim import DEFAULT_PROFILES, InProcessPSPClient, SimulatedPSP
from gateway.psp_sim.profiles import PSPProfile

_PSP = PSPConfig()
_WORKER = WorkerConfig()
_METRICS = MetricsConfig()


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What one worker runs with; `from_config` takes it from the validated config (the defaults are the
    config's), so nothing here checks ranges again."""

    psp_time_scale: float = _PSP.time_scale
    psps: tuple[str, ...] = _PSP.psps
    psp_seed: int = _PSP.seed
    psp_timeout_ms: int = _PSP.timeout_ms
    inflight_max: int = _WORKER.inflight_max
    reconcile_interval_ms: int = _WORKER.reconcile_interval_ms
    psp_url: str | None = None
    db_connections: int = _WORKER.db_connections
    batch_records_max: int = _WORKER.batch_records_max
    batch_linger_ms: float = _WORKER.batch_linger_ms
    wave_linger_ms: float = _WORKER.wave_linger_ms
    psp_profiles: dict[str, PSPProfileConfig] = field(default_factory=dict)
    psp_inflight_share_max: float = _PSP.inflight_share_max
    router: RouterConfig = field(default_factory=RouterConfig)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    metrics_check_interval_ms: int = _METRICS.check_interval_ms
    ledger_check_interval_ms: int = _METRICS.ledger_check_interval_ms

    @classmethod
    def from_config(cls, cfg: Config) -> WorkerSettings:
        w, p = cfg.worker, cfg.psp
        return cls(
            psp_time_scale=p.time_scale, psps=p.psps, psp_seed=p.seed, psp_timeout_ms=p.timeout_ms,
            inflight_max=w.inflight_max, reconcile_interval_ms=w.reconcile_interval_ms, psp_url=p.url or None,
            db_connections=w.db_connections, batch_records_max=w.batch_records_max,
            batch_linger_ms=w.batch_linger_ms, wave_linger_ms=w.wave_linger_ms, psp_profiles=dict(p.profiles),
            psp_inflight_share_max=p.inflight_share_max, router=cfg.router, webhooks=webhook_settings(cfg.webhooks),
            metrics_check_interval_ms=cfg.metrics.check_interval_ms,
            ledger_check_interval_ms=cfg.metrics.ledger_check_interval_ms,
        )



@dataclass(slots=True)
class PSPs:
    sims: dict[str, SimulatedPSP]  # empty when the PSPs are a `gateway psp-sim` over HTTP
    clients: dict[str, PSPClient]  # the bulkheads, by PSP name
    bulkheads: dict[str, Bulkhead]
    router: Router
    policy: RetryPolicy


def profile(s: WorkerSettings, name: str) -> PSPProfile:
    """The simulator profile of `name` with the `[psp.profiles.<name>]` overrides applied."""
    override = s.psp_profiles.get(name)
    changes = {k: v for k, v in asdict(override).items() if v is not None} if override is not None else {}
    return dataclasses.replace(DEFAULT_PROFILES[name], **changes)


def build_psps(s: WorkerSettings, observer: CallObserver | None = None) -> PSPs:
    profiles = {name: profile(s, name) for name in s.psps}
    timeout_s = s.psp_timeout_ms / 1000
    sims: dict[str, SimulatedPSP] = {}
    inner: dict[str, PSPClient]
    if s.psp_url is not None:
        inner = {name: HTTPPSPClient(s.psp_url, name, timeout_s=timeout_s) for name in s.psps}
    else:
        sims = {name: SimulatedPSP(p, seed=s.psp_seed, time_scale=s.psp_time_scale) for name, p in profiles.items()}
        inner = {name: InProcessPSPClient(sim, timeout_s=timeout_s) for name, sim in sims.items()}
    bulkheads = {
        name: Bulkhead(client, max(1, int(profiles[name].capacity_inflight_max * s.psp_inflight_share_max)),
                       capacity_inflight=profiles[name].capacity_inflight_max, observer=observer)
        for name, client in inner.items()
    }
    r = s.router
    router = Router(
        [PSPRoute(p.name, p.fee_bps, p.fee_fixed_minor, p.latency_ms_base * s.psp_time_scale)
         for p in profiles.values()],
        window_size=r.window_calls, weights=ScoreWeights(**asdict(r.weights)),
        breaker=BreakerConfig(**asdict(r.breaker)),
    )
    return PSPs(sims, dict(bulkheads), bulkheads, router, RetryPolicy(**asdict(r.retry)))


# The process's cyclic garbage collector, once a worker starts: the young generation collected every
# 50,000 allocations instead of 700 and the oldest rarely. The worker makes short-lived objects by
# the hundred per payment (freed by reference counting, not by the collector) and keeps long-lived
# ones (the in-process simulators' transactions): at the defaults the collector took 157-224 us per
# payment over 20,000 payments (bench/settle_rate.py), at these 7 us.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Sets `GC_THRESHOLDS` for the process (a worker is its process's main work)."""
    gc.set_threshold(*GC_THRESHOLDS)
