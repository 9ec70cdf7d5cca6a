"""Merchants managed live against a running gateway: `gateway merchant list|show|update|rotate-key|
revoke-key|audit` on the same data dir, and the admin API behind them. The running gateway sees each
change without a restart (it re-reads merchants every `[merchants] refresh_ms`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support import Gateway, auth, create_merchant, run_cli

ADMIN_KEY = "ak_test_merchants_admin"
PAYMENT = {"amount": 1000, "currency": "USD", "payment_method": "tok_visa"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("merchants") / "data",
                extra_env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_PSP_TIME_SCALE": "0"}).start()
    yield g
    g.stop()


def _cli(g: Gateway, *args: str) -> object:
    return json.loads(run_cli("merchant", *args, "--data-dir", str(g.data_dir)).stdout)


def _status(g: Gateway, key: str) -> int:
    return httpx.post(f"{g.url}/v1/payments", headers=auth(key), json=PAYMENT, timeout=10).status_code


def _until(what: str, check: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def test_list_and_show_print_prefixes_and_limits_never_a_key(gw: Gateway) -> None:
    m = create_merchant(gw.data_dir, "Listed Shop", "--rate-limit-per-s", "50")
    listed = _cli(gw, "list")
    assert isinstance(listed, list)
    mine = next(x for x in listed if x["id"] == m["id"])
    assert mine["name"] == "Listed Shop" and mine["rate_limit_per_s"] == 50
    assert mine["key_prefixes"] == [m["api_key"][:12]]
    text = run_cli("merchant", "list", "--data-dir", str(gw.data_dir)).stdout
    assert m["api_key"] not in text
    shown = _cli(gw, "show", m["id"])
    assert shown["keys"][0]["state"] == "active"
    assert run_cli("merchant", "show", "acct_nope", "--data-dir", str(gw.data_dir), check=False).returncode == 1


def test_a_rate_limit_update_reaches_the_running_gateway(gw: Gateway) -> None:
    m = create_merchant(gw.data_dir, "Throttled Shop")
    key = m["api_key"]
    assert [_status(gw, key) for _ in range(5)] == [201] * 5  # the default limit is far away
    _cli(gw, "update", m["id"], "--rate-limit-per-s", "0.01", "--rate-limit-burst", "1", "--actor", "ops:ana")
    _until("the new limit answers 429", lambda: _status(gw, key) == 429)
    audit = _cli(gw, "audit", m["id"])
    assert audit[0]["action"] == "update" and audit[0]["actor"] == "ops:ana"
    assert audit[0]["detail"]["rate_limit_per_s"] == {"from": None, "to": 0.01}


def test_a_rotated_key_works_at_once_and_the_old_one_only_for_the_overlap(gw: Gateway) -> None:
    m = create_merchant(gw.data_dir, "Rotating Shop")
    old = m["api_key"]
    assert _status(gw, old) == 201
    rotated = _cli(gw, "rotate-key", m["id"], "--overlap-s", "3")
    assert rotated["id"] == m["id"] and rotated["api_key"] != old
    new = rotated["api_key"]
    _until("the new key works", lambda: _status(gw, new) == 201)
    assert _status(gw, old) == 201  # inside the overlap window
    _until("the old key stops after the overlap", lambda: _status(gw, old) == 401)
    assert _status(gw, new) == 201
    states = {k["prefix"]: k["state"] for k in _cli(gw, "show", m["id"])["keys"]}
    assert states == {old[:12]: "expired", new[:12]: "active"}


def test_rotation_keeps_the_old_key_for_the_default_overlap_and_revocation_stops_a_key_now(gw: Gateway) -> None:
    m = create_merchant(gw.data_dir, "Revoking Shop")
    old = m["api_key"]
    assert _status(gw, old) == 201
    new = _cli(gw, "rotate-key", m["id"])["api_key"]  # default overlap: 24 h
    _until("the new key works", lambda: _status(gw, new) == 201)
    assert _status(gw, old) == 201
    assert _cli(gw, "show", m["id"])["keys"][0]["expires_ms"] > time.time() * 1000 + 23 * 3600 * 1000
    _cli(gw, "revoke-key", m["id"], "--key", old, "--actor", "ops:bo")
    _until("the revoked key answers 401", lambda: _status(gw, old) == 401)
    assert _status(gw, new) == 201
    actions = [(a["action"], a["actor"]) for a in _cli(gw, "audit", m["id"])]
    assert actions[0] == ("revoke_key", "ops:bo")
    assert [a for a, _ in actions] == ["revoke_key", "rotate_key", "create"]
    assert run_cli("merchant", "revoke-key", m["id"], "--key", "sk_test_not_hers", "--data-dir", str(gw.data_dir),
                   check=False).returncode == 1


def test_the_admin_api_lists_updates_and_rotates_with_the_admin_key_only(gw: Gateway) -> None:
    m = create_merchant(gw.data_dir, "Admin Shop")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert c.get("/v1/admin/merchants").status_code == 401
        assert c.get("/v1/admin/merchants", headers=auth(m["api_key"])).status_code == 401
        listed = c.get("/v1/admin/merchants", headers=admin).json()["data"]
        assert m["id"] in {x["id"] for x in listed}
        r = c.post(f"/v1/admin/merchants/{m['id']}", headers=admin, json={"rate_limit_per_s": 20, "actor": "api:cy"})
        assert r.status_code == 200 and r.json()["rate_limit_per_s"] == 20
        r = c.post(f"/v1/admin/merchants/{m['id']}", headers=admin, json={"rate_limit_per_s": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "rate_limit_per_s"
        r = c.post(f"/v1/admin/merchants/{m['id']}/rotate_key", headers=admin, json={"overlap_s": 0})
        assert r.status_code == 200
        new = r.json()["api_key"]
        _until("the API-rotated key works", lambda: _status(gw, new) == 201)
        _until("the old key stops at once (overlap 0)", lambda: _status(gw, m["api_key"]) == 401)
        audit = c.get(f"/v1/admin/merchants/{m['id']}/audit", headers=admin).json()["data"]
        assert [a["action"] for a in audit][:2] == ["rotate_key", "update"]
        assert c.get("/v1/admin/merchants/acct_missing", headers=admin).status_code == 404
    assert new not in Path(gw.log_path).read_text()
