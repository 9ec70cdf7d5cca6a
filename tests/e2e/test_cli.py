"""The operator contract of the `gateway` command."""

from __future__ import annotations

from pathlib import Path

from support import REPO, run_cli


def test_merchant_create_prints_id_and_key_and_stores_only_a_hash(tmp_path: Path) -> None:
    import json

    out = json.loads(run_cli("merchant", "create", "--name", "Shop", "--data-dir", str(tmp_path)).stdout)
    assert out["id"].startswith("acct_") and out["api_key"].startswith("sk_test_")
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert out["api_key"].encode() not in f.read_bytes()


def test_shipped_config_is_valid() -> None:
    r = run_cli("config", "check", "--config", str(REPO / "config" / "gateway.toml"))
    assert "ok" in r.stdout


def test_config_check_names_file_key_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, key, reason in [
        ("[wal]\nfsync_interval_us = -1\n", "wal.fsync_interval_us", ">= 0"),
        ("[wal]\nfsync_intervl_us = 5\n", "wal.fsync_intervl_us", "unknown key"),
        ("[server]\nport = \"x\"\n", "server.port", "Expected `int`"),
        ("[server]\nmode = \"cloud\"\n", "server.mode", "Invalid enum value 'cloud'"),
    ]:
        bad.write_text(text)
        r = run_cli("config", "check", "--config", str(bad), check=False)
        assert r.returncode == 2
        assert str(bad) in r.stderr and key in r.stderr and reason in r.stderr, r.stderr
    bad.write_text("[wal\n")
    r = run_cli("config", "check", "--config", str(bad), check=False)
    assert r.returncode == 2 and "not valid TOML" in r.stderr
