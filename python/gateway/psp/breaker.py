"""A circuit breaker per PSP: keeps traffic away from a PSP that is failing, probes it after a cool-down.

closed --(failure ratio over the window, or N failures in a row)--> open --(cool-down)--> half-open;
half-open lets `half_open_probes_max` calls through: a success closes it, a failure opens it again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

WINDOW_SIZE_MAX = 10_000


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The `[router.breaker]` config section (same names; gateway.config checks the ranges, the asserts
    of `CircuitBreaker` are invariants)."""

    # Opens when, over the last `window_calls` calls (at least `calls_min`), the failure ratio
    # reaches `failure_ratio_threshold`, or after `consecutive_failures_max` failures in a row.
    window_calls: int = 20
    calls_min: int = 10
    failure_ratio_threshold: float = 0.5
    consecutive_failures_max: int = 5
    cooldown_s: float = 30.0
    half_open_probes_max: int = 1


DEFAULT_BREAKER = BreakerConfig()

class CircuitBreaker:
    def __init__(
        self, config: BreakerConfig = DEFAULT_BREAKER, clock: Callable[[], float] = time.monotonic
    ) -> None:
        assert 1 <= config.calls_min <= config.window_calls <= WINDOW_SIZE_MAX
        assert 0.0 < config.failure_ratio_threshold <= 1.0 and config.half_open_probes_max >= 1
        self.config = config
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._recent: deque[bool] = deque(maxlen=config.window_calls)
        self._consecutive_failures = 0
        self._probes_inflight = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.config.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probes_inflight = 0
        return self._state

    def observed_state(self) -> BreakerState:
        """The state as `state` would report it, without moving it (safe from another thread: metrics)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.config.cooldown_s:
            return BreakerState.HALF_OPEN
        return self._state

    def can_try(self) -> bool:
        """Whether a call would be allowed now (does not reserve a half-open probe)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and self._probes_inflight < self.config.half_open_probes_max

    def allow(self) -> bool:
        """Whether to make a call now; in half-open this reserves one of the probe slots."""
        if not self.can_try():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._probes_inflight += 1
        return True

    def record(self, success: bool) -> None:
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._probes_inflight = max(0, self._probes_inflight - 1)
            if success:
                self._close()
            else:
                self._open()
            return
        if state is BreakerState.OPEN:
            return
        self._recent.append(success)
        self._consecutive_failures = 0 if success else self._consecutive_failures + 1
        failures = self._recent.count(False)
        ratio_tripped = (
            len(self._recent) >= self.config.calls_min
            and failures / len(self._recent) >= self.config.failure_ratio_threshold
        )
        if ratio_tripped or self._consecutive_failures >= self.config.consecutive_failures_max:
            self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._recent.clear()
        self._consecutive_failures = 0

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._recent.clear()
        self._consecutive_failures = 0
