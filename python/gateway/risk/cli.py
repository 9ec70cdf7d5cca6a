"""`gateway rules ...` and `gateway lists ...`: clients of the running gateway's admin API.

Changes go through the server (`--url`, default http://127.0.0.1:8080; admin key from the environment
variable `GATEWAY_ADMIN_KEY`), so they take effect at once, without a restart, and are versioned and
audited there. `gateway rules backtest FILE --data-dir DIR` also runs offline, reading the WAL and the
SQLite store of DIR directly.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
KEY_ENV = "GATEWAY_ADMIN_KEY"
TIMEOUT_S = 300


class _CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    key = os.environ.get(KEY_ENV, "")
    if not key:
        raise _CliError(f"set the admin key in the environment variable {KEY_ENV}", 2)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            err = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            raise _CliError(f"HTTP {e.code}: {raw[:500]!r}") from None
        lines = [f"error: {err.get('code')}: {err.get('message')}"] if not err.get("errors") else [
            f"error: {err.get('code')}: the ruleset has {len(err['errors'])} error(s)"]
        lines += [f"  {args_file(args)}:{x['line']}:{x['column']}: {x['kind']}: {x['message']}"
                  for x in err.get("errors") or []]
        raise _CliError("\n".join(lines)) from None
    except urllib.error.URLError as e:
        raise _CliError(f"cannot reach the gateway at {args.url}: {e.reason}") from None


def args_file(args: argparse.Namespace) -> str:
    return str(getattr(args, "file", "") or "rules")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _read(path: str) -> str:
    try:
        return Path(path).read_text() if path != "-" else sys.stdin.read()
    except OSError as e:
        raise _CliError(f"cannot read {path}: {e.strerror}", 2) from None


def _author(args: argparse.Namespace) -> str:
    if getattr(args, "author", None):
        return str(args.author)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def rules_push(args: argparse.Namespace) -> None:
    body = {"source": _read(args.file), "author": _author(args), "comment": args.comment or "",
            "shadow": bool(args.shadow)}
    if args.merchant:
        body["merchant_id"] = args.merchant
    _print(_call(args, "POST", "/v1/admin/rules", body))


def rules_history(args: argparse.Namespace) -> None:
    q = f"?limit={args.limit}" + (f"&merchant_id={args.merchant}" if args.merchant else "")
    _print(_call(args, "GET", "/v1/admin/rules/history" + q))


def rules_rollback(args: argparse.Namespace) -> None:
    _print(_call(args, "POST", "/v1/admin/rules/rollback",
                 {"version": args.version, "author": _author(args), "comment": args.comment or ""}))


def rules_shadow(args: argparse.Namespace) -> None:
    if args.action == "stats":
        _print(_call(args, "GET", "/v1/admin/rules/shadow"))
    else:
        _print(_call(args, "DELETE", "/v1/admin/rules/shadow"))


def rules_backtest(args: argparse.Namespace) -> None:
    source = _read(args.file)
    if args.data_dir:
        _print(offline_backtest(Path(args.data_dir), args.config, source, args.merchant, args.since_ms,
                                args.until_ms))
        return
    body: dict[str, Any] = {"source": source, "since_ms": args.since_ms}
    if args.until_ms is not None:
        body["until_ms"] = args.until_ms
    if args.merchant:
        body["merchant_id"] = args.merchant
    _print(_call(args, "POST", "/v1/admin/rules/backtest", body))


def offline_backtest(data_dir: Path, config_path: str | None, source: str, merchant_id: str | None,
                     since_ms: int = 0, until_ms: int | None = None) -> Any:
    """The backtest without a server (embedded mode's data folder): the WAL and the store of `data_dir`,
    the configured model and GeoIP table (the Python port of the fast path's IP table, `gateway.risk.geo`)."""
    from gateway import config as config_mod
    from gateway.feed.eventlog import TIME_MS_MAX, EventLogError, WalEventLog
    from gateway.risk import control as ctl
    from gateway.risk.geo import GeoTable
    from gateway.store.sqlite import SqliteStore

    cfg = config_mod.load(config_path).risk
    db = data_dir / "gateway.db"
    if not db.exists():
        raise _CliError(f"no store at {db}", 2)
    geo = GeoTable.from_csv(Path(cfg.geoip_file).read_text()) if cfg.geoip_file else GeoTable.builtin()
    model = (Path(cfg.model_path) if cfg.model_path else ctl.SHIPPED_MODEL).read_bytes()
    store = SqliteStore(db)
    try:
        store.migrate()
        try:
            engine = ctl.backtest_engine(store._conn(), source, merchant_id, model,
                                         cfg.backtest_keys_per_dimension_max)
        except ctl.RulesInvalid as e:
            lines = [f"error: rules_invalid: the ruleset has {len(e.errors)} error(s)"]
            lines += [f"  {x['line']}:{x['column']}: {x['kind']}: {x['message']}" for x in e.errors]
            raise _CliError("\n".join(lines)) from None
        # Every complete record, read-only. Not `wal_scan`: it is crash recovery and cuts a torn tail, which
        # against the WAL of a running gateway could cut a batch that is being written.
        until = until_ms if until_ms is not None else TIME_MS_MAX
        if not 0 <= since_ms <= until:
            raise _CliError("--since-ms and --until-ms must satisfy 0 <= since <= until", 2)
        try:
            return ctl.backtest_log(engine, WalEventLog(str(data_dir / "wal")), geo.country,
                                    cfg.backtest_records_max, since_ms=since_ms, until_ms=until)
        except EventLogError as e:
            raise _CliError(f"error: {e}") from None
    finally:
        store.close()


def lists_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"name": args.list, "kind": args.kind, "author": _author(args)}
    if args.entries_max:
        body["entries_max"] = args.entries_max
    _print(_call(args, "POST", "/v1/admin/lists", body))


def lists_change(args: argparse.Namespace) -> None:
    _print(_call(args, "POST", f"/v1/admin/lists/{args.list}/{args.lists_command}",
                 {"values": args.values, "author": _author(args)}))


def lists_load(args: argparse.Namespace) -> None:
    values = [v.strip() for v in _read(args.file).splitlines()]
    values = [v for v in values if v and not v.startswith("#")]
    _print(_call(args, "POST", f"/v1/admin/lists/{args.list}/load", {"values": values, "author": _author(args)}))


def lists_get(args: argparse.Namespace) -> None:
    if args.list:
        _print(_call(args, "GET", f"/v1/admin/lists/{args.list}?limit={args.limit}"))
    else:
        _print(_call(args, "GET", "/v1/admin/lists"))


def _run(fn: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            fn(args)
        except _CliError as e:
            print(str(e), file=sys.stderr)
            return e.code
        return 0

    return wrapped


def add_parsers(sub: Any) -> None:
    """Adds `rules` and `lists` to the `gateway` command's subparsers."""

    def client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL}); key from ${KEY_ENV}")
        p.add_argument("--author", help="recorded in the history and audit trail (default: the login name)")
        return p

    r = sub.add_parser("rules", help="risk rules: push, history, rollback, shadow, backtest (admin API)")
    rsub = r.add_subparsers(dest="rules_command", required=True)
    p = client(rsub.add_parser("push", help="validate, store and activate a ruleset (or install it as shadow)"))
    p.add_argument("file", help="rules file ('-' for stdin)")
    p.add_argument("--merchant", help="the ruleset of this merchant instead of the global one")
    p.add_argument("--comment")
    p.add_argument("--shadow", action="store_true", help="evaluate beside the live global ruleset, count differences")
    p.set_defaults(func=_run(rules_push))
    p = client(rsub.add_parser("history", help="ruleset versions, newest first"))
    p.add_argument("--merchant")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_run(rules_history))
    p = client(rsub.add_parser("rollback", help="make VERSION's source live again, as a new version"))
    p.add_argument("version", type=int)
    p.add_argument("--comment")
    p.set_defaults(func=_run(rules_rollback))
    p = client(rsub.add_parser("shadow", help="shadow ruleset: stats or clear"))
    p.add_argument("action", choices=["stats", "clear"])
    p.set_defaults(func=_run(rules_shadow))
    p = client(rsub.add_parser("backtest", help="replay recorded payments through a candidate ruleset"))
    p.add_argument("file")
    p.add_argument("--merchant", help="the candidate replaces this merchant's ruleset")
    p.add_argument("--data-dir", help="run offline on this data folder (WAL + store) instead of the server")
    p.add_argument("--config", help="with --data-dir: the config whose [risk] model and GeoIP file to use")
    p.add_argument("--since-ms", type=int, default=0, help="replay payments accepted at or after this time (ms)")
    p.add_argument("--until-ms", type=int, help="... and before this time (ms; default: now, or the end of the WAL)")
    p.set_defaults(func=_run(rules_backtest))

    lst = sub.add_parser("lists", help="risk lists: create, add, remove, load, get (admin API)")
    lsub = lst.add_subparsers(dest="lists_command", required=True)
    p = client(lsub.add_parser("create", help="create a list"))
    p.add_argument("list")
    p.add_argument("--kind", required=True, choices=["card", "bin", "email", "ip", "device", "country", "string"])
    p.add_argument("--entries-max", type=int)
    p.set_defaults(func=_run(lists_create))
    for op in ("add", "remove"):
        p = client(lsub.add_parser(op, help=f"{op} values"))
        p.add_argument("list")
        p.add_argument("values", nargs="+", metavar="VALUE")
        p.set_defaults(func=_run(lists_change))
    p = client(lsub.add_parser("load", help="make the list hold exactly the values of FILE (one per line)"))
    p.add_argument("list")
    p.add_argument("file")
    p.set_defaults(func=_run(lists_load))
    p = client(lsub.add_parser("get", help="a list's entries, or every list without LIST"))
    p.add_argument("list", nargs="?")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=_run(lists_get))
