"""The cluster-mode services answer as the gateway will use them: Redis SET NX locks, PostgreSQL
transactions, and an idempotent Kafka producer whose keyed message a consumer reads back."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg_pool import ConnectionPool

from .conftest import ServiceUrls, run_services_up, services_dir

# The whole module needs the services; the first test also pays for a first-time install.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(960)]

KAFKA_TIMEOUT_S = 30.0
TOPIC_PARTITIONS = 3


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=TOPIC_PARTITIONS, replication_factor=1)])
    futures[topic].result(timeout=KAFKA_TIMEOUT_S)


def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic])[topic].result(timeout=KAFKA_TIMEOUT_S)


def produce_keyed(bootstrap: str, topic: str, key: bytes, value: bytes) -> tuple[int, int]:
    """Produces one message with the idempotent producer settings and returns its (partition, offset)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
        }
    )
    delivered: list[tuple[int, int]] = []
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, message: object) -> None:
        if error is not None:
            errors.append(error)
        else:
            delivered.append((message.partition(), message.offset()))  # type: ignore[attr-defined]

    producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    remaining = producer.flush(KAFKA_TIMEOUT_S)
    assert remaining == 0, f"{remaining} message(s) not delivered within {KAFKA_TIMEOUT_S}s"
    assert not errors, f"delivery failed: {errors}"
    assert len(delivered) == 1
    return delivered[0]


def consume_all(bootstrap: str, topic: str, expected_count: int) -> list[tuple[bytes | None, bytes | None]]:
    """Reads the topic from the beginning with a fresh consumer group until expected_count messages arrive."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("test-group"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[bytes | None, bytes | None]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + KAFKA_TIMEOUT_S
        while len(received) < expected_count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                raise KafkaException(message.error())
            received.append((message.key(), message.value()))
    finally:
        consumer.close()
    return received


def test_redis_set_nx_grants_the_lock_to_the_first_caller_only(services: ServiceUrls) -> None:
    client = redis.Redis.from_url(services.redis_url)
    try:
        key = unique("idem:merchant-1")
        assert client.set(key, "first", nx=True, ex=60) is True
        # A second request with the same idempotency key must not take over the in-flight lock.
        assert client.set(key, "second", nx=True, ex=60) is None
        assert client.get(key) == b"first"
        assert 0 < client.ttl(key) <= 60
        client.delete(key)
        assert client.set(key, "third", nx=True, ex=60) is True
        assert client.get(key) == b"third"
        client.delete(key)
    finally:
        client.close()


def test_postgres_commits_and_rolls_back_transactions(services: ServiceUrls) -> None:
    table = unique("payments_test").replace("-", "_")
    with (
        ConnectionPool(services.database_url, min_size=1, max_size=2, open=True) as pool,
        pool.connection() as conn,
    ):
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("gateway", "gateway")
        conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, amount_minor bigint NOT NULL)")
        conn.commit()
        try:
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", ("pay_1", 1250))
                # Inside the transaction the row is visible to its own connection.
                row = conn.execute(f"SELECT amount_minor FROM {table} WHERE id = %s", ("pay_1",)).fetchone()
                assert row == (1250,)
            # A failing statement rolls back the whole transaction, including the insert before it.
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", ("pay_2", 500))
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", ("pay_1", 999))
            conn.commit()
            # A second connection sees the committed row and nothing of the rolled-back transaction.
            with pool.connection() as other:
                rows = other.execute(f"SELECT id, amount_minor FROM {table} ORDER BY id").fetchall()
            assert rows == [("pay_1", 1250)]
        finally:
            conn.rollback()
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.commit()


def test_kafka_idempotent_producer_message_is_consumed_back_with_its_key(services: ServiceUrls) -> None:
    topic = unique("payments-test")
    create_topic(services.kafka_bootstrap, topic)
    key = b"pay_" + uuid.uuid4().hex.encode()
    value = b'{"status":"processing","amount_minor":1250,"currency":"EUR"}'

    try:
        partition, offset = produce_keyed(services.kafka_bootstrap, topic, key, value)

        assert 0 <= partition < TOPIC_PARTITIONS
        assert offset == 0  # the first message of a fresh topic
        assert consume_all(services.kafka_bootstrap, topic, expected_count=1) == [(key, value)]
    finally:
        delete_topic(services.kafka_bootstrap, topic)


def read_pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def test_services_up_twice_keeps_running_processes_and_their_data(services: ServiceUrls) -> None:
    root = services_dir()
    pidfiles = {
        "redis": root / "redis" / "redis.pid",
        "postgres": root / "postgres" / "data" / "postmaster.pid",
        "kafka": root / "kafka" / "kafka.pid",
    }
    pids_before = {name: read_pid(path) for name, path in pidfiles.items()}

    redis_key = unique("idem:rerun")
    table = unique("rerun_test").replace("-", "_")
    topic = unique("rerun-test")
    kafka_key = b"pay_rerun"
    client = redis.Redis.from_url(services.redis_url)
    try:
        assert client.set(redis_key, "kept", nx=True, ex=300) is True
        with psycopg.connect(services.database_url) as conn:
            conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY)")
            conn.execute(f"INSERT INTO {table} VALUES ('kept')")
        create_topic(services.kafka_bootstrap, topic)
        produce_keyed(services.kafka_bootstrap, topic, kafka_key, b"kept")

        settings = run_services_up()

        assert settings["REDIS_URL"] == services.redis_url
        assert settings["DATABASE_URL"] == services.database_url
        assert settings["KAFKA_BOOTSTRAP"] == services.kafka_bootstrap
        # A second `up` is a no-op: the very same processes keep serving, with their data.
        assert {name: read_pid(path) for name, path in pidfiles.items()} == pids_before
        assert client.get(redis_key) == b"kept"
        with psycopg.connect(services.database_url) as conn:
            assert conn.execute(f"SELECT id FROM {table}").fetchall() == [("kept",)]
        assert consume_all(services.kafka_bootstrap, topic, expected_count=1) == [(kafka_key, b"kept")]
    finally:
        client.delete(redis_key)
        client.close()
        with psycopg.connect(services.database_url) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        delete_topic(services.kafka_bootstrap, topic)


# -- ports, the recorded settings, and checkouts side by side ----------------------------------------

PORT_NAMES = ("REDIS_PORT", "POSTGRES_PORT", "KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "GATEWAY_PORT", "PSP_SIM_PORT",
              "WORKER_METRICS_PORT")
DEFAULTS = {"REDIS_PORT": 16379, "POSTGRES_PORT": 15432, "KAFKA_PORT": 19092, "KAFKA_CONTROLLER_PORT": 19093}
REPO_DIR = Path(__file__).resolve().parents[2]


def recorded(env_file: Path) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines()
                if line.startswith("export "))


def test_up_records_every_port_and_writes_a_ready_cluster_config(services: ServiceUrls) -> None:
    import subprocess

    from gateway.config import load

    env = recorded(services_dir() / "env")
    assert set(PORT_NAMES) <= set(env), env
    assert services.redis_url.endswith(f":{env['REDIS_PORT']}/0")
    assert f":{env['POSTGRES_PORT']}/" in services.database_url
    assert services.kafka_bootstrap.endswith(f":{env['KAFKA_PORT']}")
    assert env["GATEWAY_PSP_URL"] == f"http://127.0.0.1:{env['PSP_SIM_PORT']}"
    # The generated config works as it is: the gateway's own check, and the addresses of this checkout.
    config = services_dir() / "cluster.toml"
    check = subprocess.run([str(Path(sys.executable).parent / "gateway"), "config", "check", str(config)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    cfg = load(config, env={})
    assert (cfg.cluster.redis_url, cfg.cluster.database_url, cfg.cluster.kafka_bootstrap) == (
        services.redis_url, services.database_url, services.kafka_bootstrap)
    assert (cfg.server.port, cfg.psp.url) == (int(env["GATEWAY_PORT"]), env["GATEWAY_PSP_URL"])


def _other_checkout_env(services_path: Path, offset: int) -> dict[str, str]:
    """A second checkout on this machine: its own SERVICES_DIR, no port variables, and defaults that
    are the first checkout's ports (SERVICES_PORT_OFFSET), as if the first held the defaults."""
    env = {k: v for k, v in os.environ.items() if k not in PORT_NAMES}
    return {**env, "SERVICES_DIR": str(services_path), "SERVICES_PORT_OFFSET": str(offset)}


def test_a_second_checkout_moves_off_ports_held_by_the_first_and_reports_only_its_own(
        services: ServiceUrls, tmp_path: Path) -> None:
    import subprocess

    ours = recorded(services_dir() / "env")
    offsets = {int(ours[name]) - default for name, default in DEFAULTS.items()}
    if len(offsets) != 1 or min(offsets) < 0:
        pytest.skip(f"this session's ports {ours} are not the defaults shifted by one offset")
    env = _other_checkout_env(tmp_path / "services", offsets.pop())
    script = str(REPO_DIR / "deploy" / "services.sh")
    status = subprocess.run(["bash", script, "status"], env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    # One line per service (Kafka's names its broker), each of them stopped: the first checkout's do not count.
    lines = status.stdout.splitlines()
    assert status.returncode != 0 and len(lines) == 3 and all(line.endswith(" stopped") for line in lines), (
        status.stdout + status.stderr)
    ports = subprocess.run(["bash", script, "ports"], env=env, capture_output=True, text=True, timeout=60,
                           check=True)
    chosen = dict(line.split("=", 1) for line in ports.stdout.splitlines())
    for name in DEFAULTS:
        assert chosen[name] != ours[name], (name, chosen, ours)
        assert "is taken by another process" in ports.stderr
    assert len(set(chosen.values())) == len(chosen), chosen
    # The first checkout's services are untouched and still report as running.
    again = subprocess.run(["bash", script, "status"], cwd=REPO_DIR, capture_output=True, text=True, timeout=60,
                           check=False)
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_checkout_under_a_0700_folder_keeps_its_data_where_the_postgres_user_reaches_it(tmp_path: Path) -> None:
    import shutil
    import subprocess

    locked = tmp_path / "root-home"
    locked.mkdir(mode=0o700)
    locked.chmod(0o700)
    clone = locked / "gateway"
    shutil.copytree(REPO_DIR / "deploy", clone / "deploy", ignore=shutil.ignore_patterns("grafana"))
    (clone / "config").mkdir()
    # Ports given, so that nothing probes another instance's: only the data location is under test.
    env = {**{k: v for k, v in os.environ.items() if k != "SERVICES_DIR"},
           **{name: str(49_001 + i) for i, name in enumerate(PORT_NAMES)}}
    out = subprocess.run(["bash", str(clone / "deploy" / "services.sh"), "ports"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    link = clone / ".services"
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert link.is_symlink(), "the data of a checkout under a 0700 folder must live elsewhere"
        target = link.resolve()
        assert target.name.startswith("gateway-services-") and target.parent == Path("/var/tmp")
        reach = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(target)], timeout=30,
                               check=False)
        assert reach.returncode == 0, f"the postgres OS user cannot enter {target}"
    finally:
        if link.is_symlink():
            shutil.rmtree(link.resolve(), ignore_errors=True)
