"""The risk control plane in cluster mode against the real services: changes made through the admin API
of the port (served by either of two gateway processes) are stored in PostgreSQL, published on the risk
channel and applied by both processes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from support import auth, unique_token

from .test_cluster_mode import Cluster, cluster_factory  # noqa: F401 - the fixture, shared

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ADMIN_KEY = "ak_test_" + "k" * 24
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PAYMENTS = 40


def admin(cl: Cluster, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{cl.gateway.url}{path}", json=body, headers=ADMIN, timeout=30)


def started_with_admin_key(make_cluster: Callable[[], Cluster], monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """A cluster of the default kind, started, whose admin API takes ADMIN_KEY."""
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
    cl = make_cluster()
    cl.start_gateway()
    return cl


def new_card_list(cl: Cluster, name: str, values: list[str] | None = None) -> None:
    """Creates the card list `name` through the admin API and adds `values` to it."""
    r = admin(cl, "POST", "/v1/admin/lists", {"name": name, "kind": "card"})
    assert r.status_code == 201, r.text
    if values:
        r = admin(cl, "POST", f"/v1/admin/lists/{name}/add", {"values": values})
        assert r.status_code == 200 and r.json()["added"] == len(values), r.text


def push_rules(cl: Cluster, source: str) -> int:
    """Pushes the ruleset `source` through the admin API; its version."""
    r = admin(cl, "POST", "/v1/admin/rules", {"source": source, "author": "tests"})
    assert r.status_code == 201, r.text
    return r.json()["version"]


def metric_by_slot(cl: Cluster, metric: str, until: Callable[[dict[str, int]], bool], want: str,
                   timeout_s: float = 20) -> dict[str, int]:
    """Polls /metrics on new connections (the kernel spreads them over both processes) until
    `until(seen)`, where `seen` maps each process's `gateway_cluster_slot` to its `metric`."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    while not until(seen):
        assert time.monotonic() < deadline, f"{metric} by slot {seen}, want {want}"
        with httpx.Client(timeout=5) as c:
            text = c.get(f"{cl.gateway.url}/metrics").text
        slot = re.search(r"^gateway_cluster_slot (\d+)$", text, re.MULTILINE)
        got = re.search(rf"^{metric} (\d+)$", text, re.MULTILINE)
        assert slot and got, text[-2000:]
        seen[slot.group(1)] = int(got.group(1))
    return seen


def rules_version_by_slot(cl: Cluster, version: int, timeout_s: float = 20) -> dict[str, int]:
    """Polls /metrics until both processes (slots) report `version` as the version of the ruleset in
    their own engine."""
    return metric_by_slot(cl, "gateway_risk_rules_version",
                          lambda seen: len(seen) == 2 and set(seen.values()) == {version}, str(version), timeout_s)


def pay_fresh(cl: Cluster, token: str, n: int = PAYMENTS) -> list[httpx.Response]:
    """`n` payments, each on a new connection so that the kernel spreads them over both processes."""
    out = []
    for _ in range(n):
        with httpx.Client(timeout=15) as c:
            out.append(c.post(f"{cl.gateway.url}/v1/payments", headers=auth(),
                              json={"amount": 1000, "currency": "USD", "payment_method": token}))
    return out


def decline_codes(responses: list[httpx.Response]) -> list[str | int]:
    return [r.json()["error"].get("decline_code") if r.status_code == 402 else r.status_code for r in responses]


def test_list_add_rule_push_and_rollback_through_one_port_reach_both_processes(cluster_factory, monkeypatch) -> None:  # noqa: F811
    cl = started_with_admin_key(cluster_factory, monkeypatch)
    tables = {r[0] for r in cl.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", cl.schema)}
    assert {"risk_rulesets", "risk_lists", "risk_list_entries", "risk_audit"} <= tables

    stolen = unique_token("tok_s")
    clean = unique_token("tok_c")
    new_card_list(cl, "stolen_cards", [stolen])
    v_block = push_rules(cl, "stolen: block if :card: in @stolen_cards\n")

    rules_version_by_slot(cl, v_block)
    assert decline_codes(pay_fresh(cl, stolen)) == ["blocklisted"] * PAYMENTS
    assert {r.status_code for r in pay_fresh(cl, clean, 10)} == {201}

    # A ruleset that blocks nothing, then a rollback to the blocking one: both processes follow.
    rules_version_by_slot(cl, push_rules(cl, "huge: block if :amount: > 99999999\n"))
    assert {r.status_code for r in pay_fresh(cl, stolen, 20)} == {201}

    r = admin(cl, "POST", "/v1/admin/rules/rollback", {"version": v_block, "author": "tests"})
    assert r.status_code == 201, r.text
    v_back = r.json()["version"]
    assert r.json()["rollback_of"] == v_block and v_back > v_block
    rules_version_by_slot(cl, v_back)
    assert decline_codes(pay_fresh(cl, stolen)) == ["blocklisted"] * PAYMENTS

    # A removal from the list reaches both processes too; everything is in PostgreSQL.
    r = admin(cl, "POST", "/v1/admin/lists/stolen_cards/remove", {"values": [stolen]})
    assert r.status_code == 200 and r.json()["removed"] == 1, r.text
    deadline = time.monotonic() + 20
    while True:
        codes = {r.status_code for r in pay_fresh(cl, stolen, 20)}
        if codes == {201}:
            break
        assert time.monotonic() < deadline, codes
        time.sleep(0.2)
    assert cl.query("SELECT count(*) FROM risk_list_entries") == [(0,)]
    ops = [r[0] for r in cl.query("SELECT operation FROM risk_rulesets ORDER BY version")]
    assert ops == ["push", "push", "rollback"]
    pids = set(re.findall(r"risk update received on gateway:risk by pid (\d+)", cl.gateway.log()))
    assert len(pids) == 2, cl.gateway.log()[-3000:]


def test_a_restarted_process_restores_the_control_plane_from_postgres(cluster_factory, monkeypatch) -> None:  # noqa: F811
    cl = started_with_admin_key(cluster_factory, monkeypatch)
    stolen = unique_token("tok_s")
    new_card_list(cl, "bad", [stolen])
    version = push_rules(cl, "bad: block if :card: in @bad\n")
    cl.gateway.stop()
    cl.start_gateway()
    rules_version_by_slot(cl, version)
    assert decline_codes(pay_fresh(cl, stolen, 20)) == ["blocklisted"] * 20
    got = admin(cl, "GET", "/v1/admin/rules/history").json()["data"]
    assert [v["version"] for v in got] == [version] and got[0]["active"]
    report = admin(cl, "POST", "/v1/admin/rules/backtest", {"source": "x: block if :amount: > 1\n"})
    assert report.status_code == 200 and report.json()["source"] == "kafka", report.text


def pay_mix(cl: Cluster, watched: str, n: int) -> list[httpx.Response]:
    """`n` payments on new connections (spread over both processes): every third with the watched card,
    the others with fresh cards, amounts cycling through 1000, 6000 and 20000."""
    out = []
    for i in range(n):
        token = watched if i % 3 == 0 else unique_token("tok_m")
        with httpx.Client(timeout=15) as c:
            out.append(c.post(f"{cl.gateway.url}/v1/payments", headers=auth(),
                              json={"amount": (1000, 6000, 20000)[(i // 3) % 3],
                                    "currency": "USD", "payment_method": token}))
    return out


def live_actions(responses: list[httpx.Response]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in responses:
        assert r.status_code in (201, 202, 402), r.text
        action = "block" if r.status_code == 402 else r.json()["risk"]["action"]
        out[action] = out.get(action, 0) + 1
    return out


def test_backtest_in_cluster_mode_replays_every_process_from_kafka_like_the_live_engine(cluster_factory, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
    # Kafka durability: a 2xx means the record is in the topic, so the replay sees every acknowledged one.
    cl = cluster_factory(durability="kafka")
    assert cl.gateway.config_path is not None
    cl.gateway.config_path.write_text(cl.config_text + "\n[risk]\nbacktest_records_max = 50\n")
    cl.start_gateway()
    watched = unique_token("tok_w")
    new_card_list(cl, "watch", [watched])
    rules_version_by_slot(cl, push_rules(cl, "huge: block if :amount: > 99999999\n"))

    first = pay_mix(cl, watched, 30)
    assert live_actions(first) == {"allow": 30}
    time.sleep(0.05)
    middle_ms = int(time.time() * 1000)
    time.sleep(0.05)
    second = pay_mix(cl, watched, 15)
    assert live_actions(second) == {"allow": 15}
    time.sleep(0.05)
    end_ms = int(time.time() * 1000)

    candidate = ("watched: block if :card: in @watch\n"
                 "big: review if :amount: > 10000\n")
    report = admin(cl, "POST", "/v1/admin/rules/backtest", {"source": candidate})
    assert report.status_code == 200, report.text
    got = report.json()
    assert got["source"] == "kafka" and got["records"] == 45 and not got["truncated"]
    assert len(got["sources"]) == 2 and sum(got["sources"].values()) == 45, got["sources"]
    assert got["live"]["allow"] == 45

    # What the live engine decides for the same traffic once the candidate is live.
    rules_version_by_slot(cl, push_rules(cl, candidate))
    live = live_actions(pay_mix(cl, watched, 30))
    live_second = live_actions(pay_mix(cl, watched, 15))
    for action in set(live) | set(live_second):
        live[action] = live.get(action, 0) + live_second.get(action, 0)
    assert {k: v for k, v in got["candidate"].items() if v} == live
    assert live["block"] == 15 and got["changed"] == 45 - live.get("allow", 0)
    by_rule = {x["name"]: x for x in got["rules"]}
    assert by_rule["watched"]["blocked"] == 15

    # A time bound: only the second burst. A record bound: the oldest 50 of the 90 now recorded.
    bounded = admin(cl, "POST", "/v1/admin/rules/backtest", {"source": candidate, "since_ms": middle_ms,
                                                              "until_ms": end_ms}).json()
    assert bounded["records"] == 15 and not bounded["truncated"], bounded
    assert bounded["candidate"]["block"] == 5 and bounded["first_created_ms"] >= middle_ms
    cut = admin(cl, "POST", "/v1/admin/rules/backtest", {"source": candidate}).json()
    assert cut["records"] == 50 and cut["truncated"] and cut["first_created_ms"] < middle_ms
    bad = admin(cl, "POST", "/v1/admin/rules/backtest", {"source": candidate, "after_lsn": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after_lsn"


def wait_codes(cl: Cluster, token: str, want: set[int | str], timeout_s: float) -> float:
    """Seconds until `PAYMENTS` payments in a row (spread over both processes) all answer `want`."""
    started = time.monotonic()
    while True:
        got = set(decline_codes(pay_fresh(cl, token, PAYMENTS)))
        if got == want:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"still {got} after {timeout_s}s\n{cl.gateway.log()[-3000:]}"
        time.sleep(0.2)


def test_list_changes_whose_message_was_never_published_reach_both_processes_by_the_version_check(cluster_factory, monkeypatch) -> None:  # noqa: F811
    from gateway._fastpath import RiskEngine
    from gateway.risk import control as ctl
    from gateway.store.postgres import PostgresStore

    cl = started_with_admin_key(cluster_factory, monkeypatch)
    token = unique_token("tok_q")
    new_card_list(cl, "quiet")
    rules_version_by_slot(cl, push_rules(cl, "q: block if :card: in @quiet\n"))
    assert {r.status_code for r in pay_fresh(cl, token, 10)} == {201}

    # A process whose publish was lost: it commits the change to PostgreSQL and tells nobody.
    store = PostgresStore(cl.services.database_url, cl.schema)
    try:
        silent = ctl.RiskControl(store, RiskEngine(), ctl.SHIPPED_MODEL, pg_pool=store.pool, publish=None)  # type: ignore[arg-type]
        silent.restore()
        assert silent.list_add("quiet", [token], "tests") == 1
    finally:
        store.pool.close()
    # Both processes block it within a few version checks (every 2 s).
    assert wait_codes(cl, token, {"blocklisted"}, timeout_s=10) < 10

    # A removal written straight into PostgreSQL, with its audit row, in one transaction.
    with psycopg.connect(cl.services.database_url) as conn, conn.transaction():
        conn.execute(f"SET LOCAL search_path = {cl.schema}")
        conn.execute("DELETE FROM risk_list_entries WHERE list_name = 'quiet' AND value = %s", (token,))
        conn.execute("INSERT INTO risk_audit (at_ms, actor, action, target, detail) VALUES (%s, 'dba', "
                     "'list.remove', '@quiet', %s)",
                     (int(time.time() * 1000), json.dumps({"count": 1, "changed": 1, "values": [token],
                                                           "values_truncated": False})))
    wait_codes(cl, token, {201}, timeout_s=10)
    pids = set(re.findall(r"risk list @quiet repaired from the store by pid (\d+)", cl.gateway.log()))
    assert len(pids) == 2, cl.gateway.log()[-3000:]
