"""The systemd units under deploy/systemd start commands the gateway accepts, restart what dies, and
order the stop bounds so that a worker's own bound ends a stop before systemd's SIGKILL."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from gateway.cli import build_parser
from gateway.config import ClusterConfig

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVICES = ("gateway-serve.service", "gateway-worker@.service", "gateway-psp-sim.service")


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


def gateway_argv(exec_start: str) -> list[str]:
    """The gateway's own arguments in an ExecStart line (also inside `/bin/sh -c '... exec gateway ...'`)."""
    argv = shlex.split(exec_start)
    if argv[:2] == ["/bin/sh", "-c"]:
        argv = shlex.split(re.sub(r'"\$\$\{[A-Z_]+:-(\d+)\}"', r"\1", argv[2]))
        argv = argv[argv.index("exec") + 1:]
    assert argv[0].endswith("/.venv/bin/gateway"), argv
    return argv[1:]


@pytest.mark.parametrize("name", SERVICES)
def test_each_unit_starts_a_command_the_gateway_accepts_and_restarts_it(name: str) -> None:
    service = unit(name)["Service"]
    args = build_parser().parse_args(gateway_argv(service["ExecStart"]))
    assert args.config == "/etc/gateway/cluster.toml"
    assert service["Restart"] == "always"


def test_a_worker_stop_ends_in_its_own_bound_before_systemd_kills_it() -> None:
    stop_s = int(unit("gateway-worker@.service")["Service"]["TimeoutStopSec"])
    assert ClusterConfig().worker_stop_timeout_ms / 1000 < stop_s


def test_the_target_wants_every_service() -> None:
    wants = unit("gateway.target")["Unit"]["Wants"].split()
    assert {"gateway-serve.service", "gateway-psp-sim.service", "gateway-worker@0.service"} <= set(wants)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    for f in UNITS.glob("gateway*"):
        shutil.copy(f, tmp_path / f.name.replace("@.service", "@0.service"))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                         capture_output=True, text=True, timeout=60, check=False)
    # The only complaint allowed: the gateway is not installed under /opt on this machine.
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "/opt/gateway/.venv/bin/gateway" not in line]
    assert problems == [], problems
