"""The loop watchdog of cluster workers (runtime/watchdog.py), in real child processes: a stalled loop is
reported, then ends the process with its own exit status; a stop that hangs is ended within its bound;
a loop that keeps beating is left alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from gateway.runtime.watchdog import EXIT_STALLED, EXIT_STOP_TIMEOUT

CHILD_TIMEOUT_S = 30


def _run(body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent("""
        import threading, time
        from gateway.runtime.watchdog import LoopWatchdog
        stopping = threading.Event()
        dog = LoopWatchdog(stall_s=0.5, stop_s=0.5, stopping=stopping).start()
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def test_a_loop_that_stops_beating_is_reported_stalled_then_the_process_exits_for_its_supervisor() -> None:
    out = _run("""
        while not dog.stalled:
            time.sleep(0.05)  # the main loop is "blocked": no beat
        print("stalled reported", dog.stalls, flush=True)
        time.sleep(CHILD_TIMEOUT_S)
    """.replace("CHILD_TIMEOUT_S", str(CHILD_TIMEOUT_S)))
    assert out.returncode == EXIT_STALLED, out
    assert "stalled reported 1" in out.stdout


def test_a_stop_that_hangs_ends_within_its_bound() -> None:
    out = _run(f"""
        stopping.set()  # SIGTERM arrived; the stop path then blocks
        time.sleep({CHILD_TIMEOUT_S})
    """)
    assert out.returncode == EXIT_STOP_TIMEOUT, out


def test_a_loop_that_keeps_beating_is_never_ended() -> None:
    out = _run("""
        end = time.monotonic() + 2.0  # four stall bounds
        while time.monotonic() < end:
            dog.beat()
            time.sleep(0.05)
        dog.done()
        print("stalls", dog.stalls, flush=True)
    """)
    assert out.returncode == 0, out
    assert "stalls 0" in out.stdout


@pytest.mark.parametrize("stall_s", [0.0, -1.0])
def test_a_watchdog_needs_a_positive_bound(stall_s: float) -> None:
    import threading

    from gateway.runtime.watchdog import LoopWatchdog

    with pytest.raises(ValueError, match="positive"):
        LoopWatchdog(stall_s, 1.0, threading.Event())
