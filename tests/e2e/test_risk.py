"""The risk control plane over HTTP against a real gateway process: rule pushes, lists, rollback,
shadow mode, velocity, challenge and review, restart, backtest, the admin key, and the CLI."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import GATEWAY, Gateway, auth, unique_token

ADMIN_KEY = "ak_test_" + "r" * 24
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ENV = {"GATEWAY_ADMIN_KEY": ADMIN_KEY}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("risk") / "data", extra_env=ENV).start()
    yield g
    g.stop()


def card() -> str:
    """A card token no other test uses, so velocity counts start at zero."""
    return unique_token("tok_t")


def admin(g: Gateway, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.request(method, f"{g.url}{path}", json=body, headers=ADMIN if headers is None else headers,
                         timeout=30)


def push(g: Gateway, source: str, **extra: Any) -> dict[str, Any]:
    r = admin(g, "POST", "/v1/admin/rules", {"source": source, "author": "tests", **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def pay(g: Gateway, token: str, amount: int = 1000, **extra: Any) -> httpx.Response:
    return httpx.post(f"{g.url}/v1/payments", headers=auth(), timeout=10,
                      json={"amount": amount, "currency": "USD", "payment_method": token, **extra})


def make_list(g: Gateway, name: str, kind: str, values: list[str] | None = None) -> None:
    r = admin(g, "POST", "/v1/admin/lists", {"name": name, "kind": kind})
    assert r.status_code == 201, r.text
    if values:
        r = admin(g, "POST", f"/v1/admin/lists/{name}/add", {"values": values})
        assert r.status_code == 200 and r.json()["added"] == len(values), r.text


def read_back(g: Gateway, payment_id: str) -> dict[str, Any]:
    """A declined payment is readable once the WAL tailer has stored it (milliseconds)."""
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(f"{g.url}/v1/payments/{payment_id}", headers=auth(), timeout=10)
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return dict(r.json())
        time.sleep(0.02)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEWAY, *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **ENV})


def test_admin_api_without_the_admin_key_is_401(gw: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer ak_wrong"}, auth()):
        for method, path in (("GET", "/v1/admin/rules/history"), ("POST", "/v1/admin/rules"),
                             ("POST", "/v1/admin/lists"), ("GET", "/v1/admin/rules/shadow")):
            r = admin(gw, method, path, {"source": "block if :amount: > 1"}, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert ADMIN_KEY not in gw.log()


def test_push_blocks_the_next_matching_payment_and_the_trace_names_the_rule(gw: Gateway) -> None:
    stolen, good = card(), card()
    make_list(gw, "stolen_cards", "card", [stolen])
    v = push(gw, "stolen: block if :card: in @stolen_cards\n", comment="incident 42")["version"]
    r = pay(gw, stolen)
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert (err["code"], err["decline_code"]) == ("card_declined", "blocklisted")
    declined = read_back(gw, err["payment_id"])
    assert declined["status"] == "failed"
    assert declined["risk"]["rule"] == "stolen"
    assert declined["risk"]["matched_rules"] == [{"name": "stolen", "action": "block", "scope": "global"}]
    assert declined["risk"]["ruleset_version"] == v
    ok = pay(gw, good)
    assert ok.status_code == 201 and ok.json()["risk"]["action"] == "allow"
    assert ok.json()["risk"]["ruleset_version"] == v


def test_bad_push_is_refused_with_line_and_column_and_the_live_ruleset_still_answers(gw: Gateway) -> None:
    v = push(gw, "big: block if :amount: > 50000\n")["version"]
    bad = "review if :amount: > 10\nblock if :card_count_2h: > 3\nchallenge :amount: > 1\n"
    r = admin(gw, "POST", "/v1/admin/rules", {"source": bad})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "rules_invalid"
    assert [(e["line"], e["column"], e["kind"]) for e in err["errors"]] == [
        (2, 10, "unknown_attribute"), (3, 11, "syntax")]
    assert all(e["message"] for e in err["errors"])
    # Nothing changed: the live ruleset still declines big amounts and lets small ones through.
    assert pay(gw, card(), amount=60000).json()["error"]["decline_code"] == "fraudulent"
    small = pay(gw, card(), amount=20)
    assert small.status_code == 201 and small.json()["risk"]["ruleset_version"] == v
    head = admin(gw, "GET", "/v1/admin/rules/history?limit=1").json()["data"][0]
    assert head["version"] == v and head["active"]


def test_rollback_restores_the_previous_behaviour(gw: Gateway) -> None:
    v1 = push(gw, "huge: block if :amount: >= 90000\n")["version"]
    push(gw, "review if :amount: >= 90000\n")
    assert pay(gw, card(), amount=95000).status_code == 201
    r = admin(gw, "POST", "/v1/admin/rules/rollback", {"version": v1, "author": "tests"})
    assert r.status_code == 201, r.text
    rb = r.json()
    assert rb["rollback_of"] == v1 and rb["operation"] == "rollback" and rb["version"] > v1
    declined = pay(gw, card(), amount=95000)
    assert declined.status_code == 402
    assert declined.json()["error"]["decline_code"] == "fraudulent"
    missing = admin(gw, "POST", "/v1/admin/rules/rollback", {"version": 10**9})
    assert missing.status_code == 404


def test_shadow_mode_counts_differences_without_changing_decisions(gw: Gateway) -> None:
    push(gw, "review if :amount: = 1\n")
    r = admin(gw, "POST", "/v1/admin/rules/shadow", {"source": "cand: block if :amount: > 5000\n"})
    assert r.status_code == 201, r.text
    shadow_version = r.json()["version"]
    for amount in (6000, 7000, 100):
        assert pay(gw, card(), amount=amount).status_code == 201  # live decisions unchanged
    stats = admin(gw, "GET", "/v1/admin/rules/shadow").json()
    assert stats["shadow_ruleset_version"] == shadow_version
    assert (stats["evaluated"], stats["differences"]) == (3, 2)
    assert stats["by_actions"] == [["allow", "allow", 1], ["allow", "block", 2]]
    assert {s["shadow_rule"] for s in stats["samples"]} == {"cand"}
    assert admin(gw, "DELETE", "/v1/admin/rules/shadow").status_code == 200
    assert admin(gw, "GET", "/v1/admin/rules/shadow").json()["shadow_ruleset_version"] is None
    assert pay(gw, card(), amount=6000).json()["risk"].get("shadow_action") is None


def test_velocity_rule_trips_exactly_at_its_threshold(gw: Gateway) -> None:
    push(gw, "card_burst: block if :card_count_1h: > 3\n")
    c = card()
    codes = [pay(gw, c).status_code for _ in range(3)]
    assert codes == [201, 201, 201]
    fourth = pay(gw, c)
    assert fourth.status_code == 402
    assert fourth.json()["error"]["decline_code"] == "velocity_exceeded"
    assert pay(gw, card()).status_code == 201  # another card is not affected


def test_challenge_requires_action_and_review_is_flagged(gw: Gateway) -> None:
    push(gw, "sca: challenge if :amount: = 7777\nlook: review if :amount: = 8888\n")
    ch = pay(gw, card(), amount=7777).json()
    assert ch["status"] == "requires_action" and ch["next_action"] == {"type": "three_d_secure"}
    assert ch["risk"]["action"] == "challenge" and ch["risk"]["rule"] == "sca"
    rv = pay(gw, card(), amount=8888).json()
    assert rv["status"] == "processing" and rv["risk"]["review"] is True and rv["risk"]["rule"] == "look"


def test_merchant_ruleset_may_accept_a_global_challenge_but_not_a_global_block(gw: Gateway) -> None:
    push(gw, "sca: challenge if :amount: = 5555\nhard: block if :amount: = 6666\n")
    r = admin(gw, "POST", "/v1/admin/rules", {"source": "ok: allow if :amount: >= 5555\n", "merchant_id": "acct_demo"})
    assert r.status_code == 201, r.text
    try:
        accepted = pay(gw, card(), amount=5555).json()
        assert accepted["status"] == "processing" and accepted["risk"]["rule"] == "ok"
        assert accepted["risk"]["merchant_ruleset_version"] == r.json()["version"]
        assert pay(gw, card(), amount=6666).status_code == 402
    finally:
        assert admin(gw, "DELETE", "/v1/admin/rules/merchants/acct_demo").status_code == 200
    assert pay(gw, card(), amount=5555).json()["status"] == "requires_action"


def test_list_update_takes_effect_without_restart_and_survives_a_restart(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", extra_env=ENV).start()
    try:
        c = card()
        url = ("--url", g.url)
        assert cli("lists", "create", "bad_cards", "--kind", "card", *url).returncode == 0
        rules = tmp_path / "rules.txt"
        rules.write_text("# platform rules\nlisted: block if :card: in @bad_cards\n")
        out = cli("rules", "push", str(rules), "--author", "ana", "--comment", "first", *url)
        assert out.returncode == 0, out.stderr
        assert pay(g, c).status_code == 201
        out = cli("lists", "add", "bad_cards", c, *url)
        assert out.returncode == 0, out.stderr
        assert pay(g, c).json()["error"]["decline_code"] == "blocklisted"  # no restart
        bad = tmp_path / "bad.txt"
        bad.write_text("block if :card: in @nope\n")
        refused = cli("rules", "push", str(bad), *url)
        assert refused.returncode == 1 and f"{bad}:1:20: unknown_list" in refused.stderr
        g.terminate()
        g.start()
        assert pay(g, c).json()["error"]["decline_code"] == "blocklisted"  # restored from the store
        assert pay(g, card()).status_code == 201
        assert cli("lists", "remove", "bad_cards", c, *url).returncode == 0
        assert pay(g, c).status_code == 201
        history = cli("rules", "history", *url)
        assert '"author": "ana"' in history.stdout and '"comment": "first"' in history.stdout
        trail = admin(g, "GET", "/v1/admin/audit?target=@bad_cards").json()["data"]
        assert [a["action"] for a in trail] == ["list.remove", "list.add", "list.create"]
    finally:
        g.stop()


def test_backtest_counts_match_what_the_live_engine_decided(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", extra_env=ENV).start()
    try:
        hot = card()
        make_list(g, "watch", "email", ["mailinator.com"])
        source = ("velocity: block if :card_count_1h: > 2\n"
                  "disposable: review if :email: in @watch\n"
                  "big: challenge if :amount: > 40000\n"
                  "de: review if :ip_country: = 'DE'\n")
        push(g, source)
        live: dict[str, int] = {}
        traffic: list[dict[str, Any]] = [
            {"token": hot}, {"token": hot}, {"token": hot}, {"token": hot},
            {"token": card(), "customer": {"email": "x@mailinator.com"}},
            {"token": card(), "amount": 50000},
            {"token": card(), "customer": {"ip": "203.0.113.9"}},
            {"token": card(), "customer": {"ip": "192.0.2.1"}},
            {"token": card()},
        ]
        mark_ms = 0
        for i, t in enumerate(traffic):
            if i == 4:  # between the hot card's payments and the others
                time.sleep(0.02)
                mark_ms = int(time.time() * 1000)
                time.sleep(0.02)
            r = pay(g, t.pop("token"), amount=t.pop("amount", 1000), **t)
            action = "block" if r.status_code == 402 else r.json()["risk"]["action"]
            live[action] = live.get(action, 0) + 1
        assert live == {"allow": 4, "block": 2, "review": 2, "challenge": 1}
        report = admin(g, "POST", "/v1/admin/rules/backtest", {"source": source}).json()
        assert report["records"] == len(traffic)
        assert report["live"] == report["candidate"] == {"allow": 4, "block": 2, "challenge": 1, "review": 2}
        assert report["changed"] == 0
        by_rule = {r["name"]: r for r in report["rules"]}
        assert by_rule["velocity"]["blocked"] == 2 and by_rule["big"]["challenged"] == 1
        assert by_rule["disposable"]["reviewed"] == 1 and by_rule["de"]["reviewed"] == 1
        # A stricter candidate: what it would change, counted against the same traffic.
        stricter = admin(g, "POST", "/v1/admin/rules/backtest",
                         {"source": "block if :card_count_1h: > 1\n"}).json()
        assert stricter["candidate"]["block"] == 3 and stricter["changed"] == 4
        bad = admin(g, "POST", "/v1/admin/rules/backtest", {"source": "block if"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "rules_invalid"
        # Bounds: by time (records accepted in [since_ms, until_ms)), by position (after an LSN).
        assert report["source"] == "wal" and not report["truncated"]
        late = admin(g, "POST", "/v1/admin/rules/backtest", {"source": source, "since_ms": report["last_created_ms"] + 1})
        assert late.json()["records"] == 0
        timed = admin(g, "POST", "/v1/admin/rules/backtest", {"source": source, "since_ms": mark_ms}).json()
        assert timed["records"] == 5 and timed["candidate"]["block"] == 0 and timed["first_created_ms"] >= mark_ms
        early = admin(g, "POST", "/v1/admin/rules/backtest", {"source": source, "until_ms": mark_ms}).json()
        assert early["records"] == 4 and early["candidate"]["block"] == 2
        assert admin(g, "POST", "/v1/admin/rules/backtest",
                     {"source": source, "after_lsn": report["last_lsn"] - 2}).json()["records"] == 2
        wrong = admin(g, "POST", "/v1/admin/rules/backtest", {"source": source, "since_ms": 5, "until_ms": 4})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "since_ms"
        # Offline, from the data folder (the WAL read directly), the answer is the same.
        f = tmp_path / "rules.txt"
        f.write_text(source)
        out = cli("rules", "backtest", str(f), "--data-dir", str(g.data_dir))
        assert out.returncode == 0, out.stderr
        assert '"changed": 0' in out.stdout and '"block": 2' in out.stdout
        out = cli("rules", "backtest", str(f), "--data-dir", str(g.data_dir), "--since-ms", str(mark_ms))
        assert out.returncode == 0, out.stderr
        assert '"records": 5,' in out.stdout and '"source": "wal"' in out.stdout
    finally:
        g.stop()
