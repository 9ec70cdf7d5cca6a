"""Fixtures for tests against the real cluster-mode services (Redis, PostgreSQL, Kafka) on loopback.

The first test that needs them runs `deploy/services.sh up` once per session, so `make test` starts the
services itself; on a warm machine that is a no-op of about a second, on a fresh one it installs them.
Services this session started are stopped at its end (`deploy/services.sh down`), unless
`KEEP_SERVICES=1` asks to keep them for the next session; services already running before the session
(a developer's `make services-up`) are left running.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[2]
SERVICES_SCRIPT = REPO_DIR / "deploy" / "services.sh"
# A first install downloads Debian packages and the Kafka jars; later runs take seconds.
SERVICES_UP_TIMEOUT_S = 900
SETTING_NAMES = ("REDIS_URL", "DATABASE_URL", "KAFKA_BOOTSTRAP")
KEEP_SERVICES_ENV = "KEEP_SERVICES"
SERVICES_DOWN_TIMEOUT_S = 180
KAFKA_SCRIPT = REPO_DIR / "deploy" / "kafka.sh"
# Starting three brokers takes about a minute on a small machine, more when they compete for its cores.
BROKERS3_START_TIMEOUT_S = 300


@dataclass(frozen=True)
class ServiceUrls:
    redis_url: str
    database_url: str
    kafka_bootstrap: str


def run_services_up() -> dict[str, str]:
    """Runs `deploy/services.sh up` and returns the KEY=VALUE settings it prints."""
    try:
        result = subprocess.run(
            ["bash", str(SERVICES_SCRIPT), "up"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=SERVICES_UP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"deploy/services.sh up did not finish within {SERVICES_UP_TIMEOUT_S}s: {error}")
    if result.returncode != 0:
        pytest.fail(
            f"deploy/services.sh up failed with exit code {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    settings = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    missing = [name for name in SETTING_NAMES if name not in settings]
    assert not missing, f"deploy/services.sh up did not print {missing}; stdout:\n{result.stdout}"
    return settings


def services_dir() -> Path:
    return Path(os.environ.get("SERVICES_DIR", REPO_DIR / ".services")).resolve()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test under tests/cluster needs the real services, whether or not its module says so.
    cluster_dir = Path(__file__).resolve().parent
    for item in items:
        if cluster_dir in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


def services_running() -> bool:
    """`deploy/services.sh status`: every service of this checkout runs."""
    result = subprocess.run(["bash", str(SERVICES_SCRIPT), "status"], cwd=REPO_DIR, capture_output=True,
                            text=True, timeout=60, check=False)
    return result.returncode == 0


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceUrls]:
    already_running = services_running()
    settings = run_services_up()
    yield ServiceUrls(
        redis_url=settings["REDIS_URL"],
        database_url=settings["DATABASE_URL"],
        kafka_bootstrap=settings["KAFKA_BOOTSTRAP"],
    )
    if not already_running and os.environ.get(KEEP_SERVICES_ENV, "") not in ("1", "yes", "true"):
        subprocess.run(["bash", str(SERVICES_SCRIPT), "down"], cwd=REPO_DIR, capture_output=True,
                       timeout=SERVICES_DOWN_TIMEOUT_S, check=False)


def cluster_config(services: ServiceUrls, schema: str, topic: str, group: str, prefix: str,
                   durability: str = "wal", extra: str = "") -> str:
    """The config of a test cluster: two gateway processes behind one port, with the test's own
    PostgreSQL schema, Kafka topic, consumer group and Redis key prefix. `[cluster]` is the last
    section, so `extra` lines (and a test's own appended lines) belong to it."""
    return f"""
[server]
mode = "cluster"
workers = 2
durable_wait_ms_max = 5000
[rate_limit]
per_s = 100000.0
burst = 100000.0
[cluster]
redis_url = "{services.redis_url}"
database_url = "{services.database_url}"
database_schema = "{schema}"
kafka_bootstrap = "{services.kafka_bootstrap}"
topic = "{topic}"
topic_partitions = 4
consumer_group = "{group}"
redis_key_prefix = "{prefix}"
redis_timeout_ms = 300
durability = "{durability}"
{extra}"""


@dataclass(frozen=True)
class Brokers3:
    """The three-node Kafka cluster of `KAFKA_BROKERS=3 deploy/kafka.sh` (durability "replicated")."""

    bootstrap: str

    @staticmethod
    def env() -> dict[str, str]:
        return {**os.environ, "KAFKA_BROKERS": "3"}

    def start(self) -> None:
        """Starts the nodes that are not running (all three, or the ones a test killed)."""
        result = subprocess.run(["bash", str(KAFKA_SCRIPT), "start"], cwd=REPO_DIR, env=self.env(),
                                capture_output=True, text=True, timeout=BROKERS3_START_TIMEOUT_S, check=False)
        if result.returncode != 0:
            pytest.fail(f"KAFKA_BROKERS=3 deploy/kafka.sh start failed:\n{result.stderr[-3000:]}")

    def pid(self, node: int) -> int:
        return int((services_dir() / "kafka3" / f"node-{node}" / "kafka.pid").read_text().strip())


@pytest.fixture(scope="session")
def brokers3(services: ServiceUrls) -> Iterator[Brokers3]:
    """Three brokers on loopback, started once per session (after the other services, whose install
    step also fetched the broker's jars); stopped at the end like the other services, unless
    `KEEP_SERVICES=1`. Node i listens on the single node's port + 10 * i (deploy/common.sh)."""
    kafka_port = int(services.kafka_bootstrap.rsplit(":", 1)[1])
    brokers = Brokers3(",".join(f"127.0.0.1:{kafka_port + 10 * i}" for i in (1, 2, 3)))
    already_running = subprocess.run(["bash", str(KAFKA_SCRIPT), "status"], cwd=REPO_DIR, env=Brokers3.env(),
                                     capture_output=True, timeout=60, check=False).returncode == 0
    brokers.start()
    yield brokers
    if not already_running and os.environ.get(KEEP_SERVICES_ENV, "") not in ("1", "yes", "true"):
        subprocess.run(["bash", str(KAFKA_SCRIPT), "stop"], cwd=REPO_DIR, env=Brokers3.env(), capture_output=True,
                       timeout=SERVICES_DOWN_TIMEOUT_S, check=False)
