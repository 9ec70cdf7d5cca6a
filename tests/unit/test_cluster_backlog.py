"""The cluster backlog's figure (runtime/backlog.py): what it adds up, and when it is unknown."""

from __future__ import annotations

import time

import pytest
from gateway.runtime.backlog import STALE_CHECKS, ClusterBacklog


class FixedLag(ClusterBacklog):
    def __init__(self, lag: int, stored: int | None, interval_s: float = 0.05) -> None:
        super().__init__("127.0.0.1:1", "t", "g", (lambda: stored) if stored is not None else None, interval_s)
        self.fixed_lag = lag

    def kafka_lag(self) -> int:
        if self.fixed_lag < 0:
            raise RuntimeError("topic t not readable")
        return self.fixed_lag


def test_the_figure_is_the_kafka_lag_plus_the_stored_payments_still_processing() -> None:
    b = FixedLag(lag=30, stored=12)
    assert b.value is None  # not measured yet: unknown, never zero
    assert b.check() == 42 and b.value == 42 and (b.lag, b.stored) == (30, 12)
    # Workers that only store payments ([worker] enabled = false): the stored ones are not a backlog.
    assert FixedLag(lag=30, stored=None).check() == 30


def test_a_figure_older_than_its_checks_is_unknown() -> None:
    b = FixedLag(lag=5, stored=0, interval_s=0.02)
    b.check()
    assert b.value == 5
    time.sleep(0.02 * STALE_CHECKS + 0.05)
    assert b.value is None


def test_failed_checks_leave_the_figure_to_age_out_and_are_counted() -> None:
    b = FixedLag(lag=-1, stored=0, interval_s=0.02).start()
    try:
        deadline = time.monotonic() + 5
        while b.checks_failed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert b.value is None
    finally:
        b.stop()
    with pytest.raises(RuntimeError):
        b.check()
