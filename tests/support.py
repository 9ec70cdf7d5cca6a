"""Black-box helpers: start the real gateway in a subprocess and talk to it over a real socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GATEWAY = str(BIN / "gateway")
DEMO_KEY = "sk_test_demo"
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://gateway:gateway@127.0.0.1:15432/gateway")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([GATEWAY, *args], capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"gateway {' '.join(args)} failed: {proc.stderr}")
    return proc


def create_merchant(data_dir: Path, name: str, *extra: str) -> dict[str, str]:
    return json.loads(run_cli("merchant", "create", "--name", name, "--data-dir", str(data_dir), *extra).stdout)


class Gateway:
    """One `gateway serve` process group (granian's supervisor and its worker)."""

    def __init__(self, data_dir: Path, config_text: str | None = None, extra_env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"gateway-{data_dir.name}.log"
        self.config_path: Path | None = None
        if config_text is not None:
            self.config_path = data_dir.parent / f"gateway-{data_dir.name}.toml"
            self.config_path.write_text(config_text)
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> Gateway:
        args = [GATEWAY, "serve", "--data-dir", str(self.data_dir), "--port", str(self.port), "--demo"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.extra_env})
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway not ready in {timeout_s}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL to every process of the group: nothing gets a chance to flush."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._wait_port_free()

    def terminate(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            pass
        else:
            time.sleep(0.5)
        self._wait_port_free()
        return code

    def _wait_port_free(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()


def auth(key: str = DEMO_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# Fields the async path changes once the payment has been processed (status, amounts, attempts, ...).
PROCESSING_FIELDS = frozenset({"status", "amount_capturable", "amount_captured", "amount_refunded"})


def same_payment(got: dict, created: dict) -> bool:
    """Whether `got` (read later) is the payment `created` was, whatever processing did since."""
    return all(got.get(k) == v for k, v in created.items() if k not in PROCESSING_FIELDS)


_NO_DIGITS = str.maketrans("0123456789", "ghijklmnop")


def unique_token(prefix: str) -> str:
    """A fresh payment-method token without digits in its random part: a random hex run can be 12+
    digits that pass the Luhn check, and the gateway rightly refuses it as a card number."""
    return prefix + uuid.uuid4().hex[:12].translate(_NO_DIGITS)


PSP_SIM_START_S = 30


def start_psp_sim(port: int, psps: tuple[str, ...] | list[str], time_scale: float, log_path: Path) -> subprocess.Popen[bytes]:
    """`gateway psp-sim` on 127.0.0.1:`port` in its own session, returned once `/health` answers."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen([GATEWAY, "psp-sim", "--port", str(port), *(a for p in psps for a in ("--psp", p)),
                                 "--time-scale", str(time_scale)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}/health", proc, "psp-sim", PSP_SIM_START_S, log_path.read_text)
    return proc


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float,
               log: Callable[[], str] = lambda: "", poll_s: float = 0.05) -> None:
    """Returns once GET `url` answers 200; fails when `proc` exits first or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"{what} exited during start-up:\n{log()[-2000:]}"
        assert time.monotonic() < deadline, f"{what} did not start within {timeout_s} s"
        time.sleep(poll_s)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30, kill_wait_s: float | None = None) -> None:
    """SIGTERM, then SIGKILL when it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=kill_wait_s)


def throwaway_pg_store(prefix: str) -> Iterator[PostgresStore]:
    """For a fixture: a migrated PostgreSQL store in a schema of its own (`<prefix>_<random>`) on the
    server of deploy/, dropped afterwards; skips the test when the server is not reachable."""
    import psycopg
    import pytest
    from gateway.store.postgres import PostgresStore

    try:
        psycopg.connect(DATABASE_URL, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at {DATABASE_URL} (bash deploy/services.sh up): {e}")
    store = PostgresStore(DATABASE_URL, f"{prefix}_{uuid.uuid4().hex[:10]}")
    store.migrate()
    yield store
    store.drop_schema()
    store.close()

