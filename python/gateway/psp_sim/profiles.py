"""Cost, latency and failure profiles of the simulated PSPs.

Each profile describes one processor the way an operator would compare them: what it costs
(`fee_bps` of the amount plus `fee_fixed_minor` per capture), how fast it answers, how much
concurrent traffic it accepts, and how often it fails on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PSPProfile:
    """One simulated processor.

    Latency of a call is `latency_ms_base` plus a uniform jitter in `[-latency_ms_jitter,
    +latency_ms_jitter]`; with probability `latency_tail_rate` it is multiplied by
    `latency_tail_factor` to give a realistic long tail. Every duration is multiplied by the
    simulator's `time_scale`, so tests can run the same profile a hundred times faster.
    """

    name: str
    fee_bps: int
    fee_fixed_minor: int
    latency_ms_base: float = 220.0
    latency_ms_jitter: float = 40.0
    latency_tail_rate: float = 0.01
    latency_tail_factor: float = 3.0
    # At most this many calls are in flight at once; the next one is rejected at once.
    capacity_inflight_max: int = 200
    # Above this utilisation (in-flight / capacity) errors start; they rise linearly to
    # `overload_error_rate_max` at full capacity.
    overload_utilisation_threshold: float = 0.8
    overload_error_rate_max: float = 0.5
    # Spontaneous failures, independent of load: an error means "not processed", a timeout
    # means "processed, but the response was lost".
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    # How long a lost response keeps the caller waiting before the simulator gives up on it.
    timeout_hang_ms: float = 30_000.0

    def __post_init__(self) -> None:
        # ValueError, not assert: a profile may come from the simulator's configuration.
        problems = []
        if not self.name or len(self.name) > 32:
            problems.append("PSP name must be 1..32 characters")
        if self.fee_bps < 0 or self.fee_fixed_minor < 0:
            problems.append("fees must be >= 0")
        if self.latency_ms_base < 0 or not 0 <= self.latency_ms_jitter <= self.latency_ms_base:
            problems.append("latency_ms_base must be >= 0 and latency_ms_jitter in 0..latency_ms_base")
        if self.capacity_inflight_max < 1:
            problems.append("capacity_inflight_max must be >= 1")
        if not 0.0 < self.overload_utilisation_threshold <= 1.0:
            problems.append("overload_utilisation_threshold must be in (0, 1]")
        for name in ("overload_error_rate_max", "error_rate", "timeout_rate", "latency_tail_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        if problems:
            raise ValueError(f"PSP profile {self.name!r}: " + "; ".join(problems))

    def fee_minor(self, amount_minor: int) -> int:
        """Fee charged on a capture of `amount_minor`, rounded half up to the minor unit."""
        return (amount_minor * self.fee_bps + 5_000) // 10_000 + self.fee_fixed_minor


PSP_A = PSPProfile(
    name="psp_a",
    fee_bps=150,
    fee_fixed_minor=10,
    latency_ms_base=260.0,
    latency_ms_jitter=60.0,
    capacity_inflight_max=200,
)
"""Cheap and slow: the default acquirer."""

PSP_B = PSPProfile(
    name="psp_b",
    fee_bps=290,
    fee_fixed_minor=30,
    latency_ms_base=120.0,
    latency_ms_jitter=30.0,
    capacity_inflight_max=400,
)
"""Fast and expensive."""

PSP_C = PSPProfile(
    name="psp_c",
    fee_bps=120,
    fee_fixed_minor=5,
    latency_ms_base=220.0,
    latency_ms_jitter=100.0,
    latency_tail_rate=0.05,
    capacity_inflight_max=100,
    error_rate=0.08,
    timeout_rate=0.02,
)
"""Cheapest but flaky: spontaneous errors, timeouts and a heavy latency tail."""

DEFAULT_PROFILES: dict[str, PSPProfile] = {p.name: p for p in (PSP_A, PSP_B, PSP_C)}
