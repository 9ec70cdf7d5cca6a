"""The risk control plane without HTTP: versions, rollback, clear, list persistence and restore, the
backtest request builder, and the Python IP table against the fast path's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gateway._fastpath import FastPath, RiskEngine
from gateway.risk import control as ctl
from gateway.risk.geo import GeoTable
from gateway.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "gateway.db")
    s.migrate()
    return s


def plane(store: SqliteStore) -> ctl.RiskControl:
    c = ctl.RiskControl(store, RiskEngine(), ctl.SHIPPED_MODEL)
    c.restore()
    return c


def decide(c: ctl.RiskControl, card: str, amount: int = 100, now_ms: int = 1_000) -> dict:
    req = {"merchant_id": "m1", "amount": amount, "currency": "USD", "card": card}
    return dict(json.loads(c.engine.simulate_json(json.dumps(req), now_ms)))


def test_push_rollback_and_clear_are_new_versions_and_the_history_says_which_is_active(store: SqliteStore) -> None:
    c = plane(store)
    v1 = c.push("block if :amount: > 10\n", author="ana", comment="first").version
    v2 = c.push("review if :amount: > 10\n", author="bo").version
    assert decide(c, "tok_visa", 50)["action"] == "review"
    rb = c.rollback(v1, author="ana")
    assert (rb.version, rb.rollback_of, rb.source) == (v2 + 1, v1, "block if :amount: > 10\n")
    assert decide(c, "tok_visa", 50)["action"] == "block"
    assert decide(c, "tok_visa", 50)["ruleset_version"] == rb.version
    shadow = c.push("allow if :amount: > 0\n", author="ana", shadow=True).version
    cleared = c.clear(author="ana")
    assert cleared.scope == "shadow" and cleared.source is None and cleared.version == shadow + 1
    history = c.history()
    assert [h["version"] for h in history] == [cleared.version, shadow, rb.version, v2, v1]
    assert [h["active"] for h in history] == [False, False, True, False, False]
    assert [rv.version for rv in c.active()] == [rb.version]


def test_bad_push_changes_nothing_and_reports_every_error(store: SqliteStore) -> None:
    c = plane(store)
    v = c.push("block if :amount: > 10\n", author="ana").version
    with pytest.raises(ctl.RulesInvalid) as e:
        c.push("block if :nope: > 1\nreview if\n", author="ana")
    assert [(x["line"], x["column"], x["kind"]) for x in e.value.errors] == [
        (1, 10, "unknown_attribute"), (2, 10, "syntax")]
    assert c.engine.rules_version() == v and [h["version"] for h in c.history()] == [v]


def test_lists_and_rules_survive_a_restart_of_the_engine(store: SqliteStore) -> None:
    c = plane(store)
    c.create_list("bad", "email", None, "ana")
    assert c.list_add("bad", ["Evil@Example.COM", "mailinator.com"], "ana") == 2
    c.push("block if :email: in @bad\n", author="ana")
    assert c.list_remove("bad", ["evil@example.com"], "ana") == 1  # stored normalised, like the engine
    assert c.list_load("bad", ["x@y.com", "mailinator.com"], "ana") == (1, 0)
    again = plane(store)  # a new engine restored from the store
    req = {"merchant_id": "m1", "amount": 1, "currency": "USD", "email": "a@mailinator.com"}
    assert json.loads(again.engine.simulate_json(json.dumps(req), 0))["decline_code"] == "blocklisted"
    assert again.get_list("bad")["values"] == ["mailinator.com", "x@y.com"]
    assert [a["action"] for a in again.audit("@bad")] == ["list.add", "list.remove", "list.add", "list.create"]


def test_a_full_list_refuses_the_whole_batch(store: SqliteStore) -> None:
    c = plane(store)
    c.create_list("tiny", "card", 2, "ana")
    with pytest.raises(ctl.ControlError) as e:
        c.list_add("tiny", ["a", "b", "c"], "ana")
    assert e.value.code == "list_full"
    assert c.get_list("tiny")["entries"] == 0
    assert json.loads(c.engine.lists_json())[0]["entries"] == 0


def listed(c: ctl.RiskControl, email: str) -> bool:
    req = {"merchant_id": "m1", "amount": 1, "currency": "USD", "email": email}
    return json.loads(c.engine.simulate_json(json.dumps(req), 0))["decline_code"] == "blocklisted"


def test_a_missed_list_change_is_repaired_by_the_version_check(store: SqliteStore) -> None:
    # Two control planes over one store stand for two processes; `b` never hears of `a`'s changes.
    a, b = plane(store), plane(store)
    a.create_list("bad", "email", None, "ana")
    a.list_add("bad", ["keep.com", "gone.com"], "ana")
    a.push("block if :email: in @bad\n", author="ana")
    b.poll()
    assert listed(b, "x@keep.com") and listed(b, "x@gone.com")
    assert b.sync_lists() == []  # nothing changed since: nothing is replayed
    a.list_remove("bad", ["gone.com"], "ana")
    a.list_add("bad", ["new.com"], "ana")
    a.list_add("bad", ["brief.com"], "ana")
    a.list_remove("bad", ["brief.com"], "ana")
    assert listed(b, "x@gone.com") and not listed(b, "x@new.com")
    assert b.sync_lists() == ["bad"]
    assert [listed(b, f"x@{d}") for d in ("keep.com", "gone.com", "new.com", "brief.com")] == [
        True, False, True, False]
    assert json.loads(b.engine.lists_json())[0]["entries"] == 2 and b.list_drift == {}


def test_a_missed_add_larger_than_its_audit_row_reloads_the_whole_list(store: SqliteStore) -> None:
    a, b = plane(store), plane(store)
    a.create_list("many", "card", None, "ana")
    b.poll()
    values = [f"tok_{i:05d}" for i in range(ctl.AUDIT_VALUES_MAX + 500)]
    a.list_add("many", values, "ana")
    assert a.audit("@many")[0]["detail"]["values_truncated"]
    assert b.sync_lists() == ["many"]
    assert json.loads(b.engine.lists_json())[0]["entries"] == len(values)


def test_a_missed_removal_larger_than_its_audit_row_is_reported_as_drift(store: SqliteStore) -> None:
    # The audit row names AUDIT_VALUES_MAX of the removed values: the others cannot be found here, so
    # the repair removes those it knows and reports the rest for a restart to reload.
    a, b = plane(store), plane(store)
    a.create_list("many", "card", None, "ana")
    values = [f"tok_{i:05d}" for i in range(ctl.AUDIT_VALUES_MAX + 500)]
    a.list_add("many", values, "ana")
    b.poll()
    a.list_remove("many", values, "ana")
    assert b.sync_lists() == ["many"]
    assert b.list_drift == {"many": 500}
    assert plane(store).engine.lists_json().count('"entries":0') == 1


def test_backtest_request_is_built_like_the_fast_path_builds_it() -> None:
    record = {"type": "payment.created", "merchant_id": "acct_1", "created_ms": 5,
              "payment": {"amount": 700, "currency": "EUR", "payment_method": "tok_visa_gb",
                          "customer": {"email": "a@b.com", "ip": "203.0.113.7", "device_id": "d1", "id": "cus_1",
                                       "country": "FR"}}}
    assert ctl.payload_risk_request(json.dumps(record).encode(), GeoTable.builtin().country) == {
        "merchant_id": "acct_1", "amount": 700, "currency": "EUR", "card": "tok_visa_gb", "email": "a@b.com",
        "ip": "203.0.113.7", "device_id": "d1", "customer_id": "cus_1", "customer_country": "FR",
        "ip_country": "DE"}
    assert ctl.payload_risk_request(b'{"type": "payment.captured"}', GeoTable.builtin().country) is None


def test_python_ip_table_answers_like_the_fast_path(tmp_path: Path) -> None:
    csv = "10.0.0.0/8,fr\n2a00::/16,IT\n"
    fp = FastPath(json.dumps({"wal_dir": str(tmp_path / "wal")}))
    try:
        fp.set_geo_csv(csv)
        table = GeoTable.from_csv(csv)
        for ip in ("192.0.2.1", "198.51.100.255", "203.0.113.0", "2001:db8::1", "2001:db9::1", "10.1.2.3",
                   "11.0.0.0", "2a00:1::5", "::ffff:192.0.2.9", "not-an-ip", "192.0.3.1"):
            assert table.country(ip) == fp.ip_country(ip), ip
    finally:
        fp.close()
