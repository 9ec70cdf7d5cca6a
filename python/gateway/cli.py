"""The one `gateway` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from gateway import config as config_mod

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore
    from gateway.store.sqlite import SqliteStore

DEMO_MERCHANT_ID = "acct_demo"
DEMO_API_KEY = "sk_test_demo"


def _data_dir(args: argparse.Namespace, cfg: config_mod.Config) -> Path:
    return Path(args.data_dir or cfg.server.data_dir)


def _open_store(data_dir: Path):
    from gateway.store.sqlite import SqliteStore

    store = SqliteStore(data_dir / "gateway.db")
    store.migrate()
    return store


def open_postgres(cfg: config_mod.Config) -> PostgresStore:
    from gateway.store.postgres import open_postgres as open_store

    return open_store(cfg)


def _open_configured_store(args: argparse.Namespace, cfg: config_mod.Config) -> SqliteStore | PostgresStore:
    """The store of the configured mode: PostgreSQL (migrated) in cluster mode, else SQLite."""
    if cfg.server.mode == "cluster":
        store = open_postgres(cfg)
        store.migrate()
        return store
    return _open_store(_data_dir(args, cfg))


def ensure_demo_merchant(data_dir: Path, cfg: config_mod.Config | None = None) -> None:
    from gateway.domain.secrets import hash_api_key

    store = open_postgres(cfg) if cfg is not None and cfg.server.mode == "cluster" else _open_store(data_dir)
    if cfg is not None and cfg.server.mode == "cluster":
        store.migrate()
    try:
        if store.merchant_by_key_hash(hash_api_key(DEMO_API_KEY)) is None:
            store.create_merchant("Demo Merchant", hash_api_key(DEMO_API_KEY), merchant_id=DEMO_MERCHANT_ID)
    finally:
        store.close()


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    data_dir = _data_dir(args, cfg)
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.demo:
        ensure_demo_merchant(data_dir, cfg)
    elif cfg.server.mode == "cluster":
        store = open_postgres(cfg)
        try:
            store.migrate()
        finally:
            store.close()
    port = args.port or cfg.server.port
    host = args.host or cfg.server.host
    workers = args.workers or cfg.server.workers
    if workers != 1 and cfg.server.mode != "cluster":
        print("error: embedded mode runs one process (one WAL writer); use cluster mode for --workers > 1",
              file=sys.stderr)
        return 2
    os.environ["GATEWAY_SETTINGS"] = msgspec.json.encode(
        {"config_path": str(Path(args.config).resolve()) if args.config else None,
         "data_dir": str(data_dir.resolve()), "demo": bool(args.demo)}
    ).decode()

    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings

    print(f"gateway: serving on http://{host}:{port} (data in {data_dir})", flush=True)
    Granian(
        "gateway.api.app:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        workers=workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        # No WebSocket routes: an `Upgrade: websocket` request reaches the app like any other request
        # (and gets the error object) instead of granian's plain-text handshake refusal.
        websockets=False,
        http1_settings=HTTP1Settings(header_read_timeout=cfg.server.header_read_timeout_ms,
                                     max_buffer_size=cfg.server.http1_buffer_bytes_max),
        backlog=cfg.server.backlog,
        # A worker process that dies (SIGKILL, OOM) is started again; in cluster mode the new one claims
        # the WAL slot the dead one's lock released, and its relay resumes from that slot's checkpoint.
        # (Granian itself exits on a crash loop: a second death within 5.5 s of a respawn.)
        respawn_failed_workers=True,
        log_level="warning",  # type: ignore[arg-type]
        log_access=False,
    ).serve()
    return 0


def cmd_merchant_create(args: argparse.Namespace) -> int:
    from gateway.domain.secrets import Secret, hash_api_key, new_api_key

    cfg = config_mod.load(args.config)
    if not 1 <= len(args.name) <= 200:
        print("error: --name must be 1 to 200 characters", file=sys.stderr)
        return 2
    key = Secret(args.api_key) if args.api_key else new_api_key()
    store = _open_configured_store(args, cfg)
    try:
        m = store.create_merchant(args.name, hash_api_key(key.expose()), rate_limit_per_s=args.rate_limit_per_s,
                                  rate_limit_burst=args.rate_limit_burst)
        from gateway.store.merchants import MerchantAdmin

        MerchantAdmin(store).record_created(m.id, "cli", key.expose())
    finally:
        store.close()
    # The only place a key is ever shown in clear: to the operator who created it.
    print(json.dumps({"id": m.id, "name": m.name, "api_key": key.expose()}))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Exit 0 and a summary when the file (with the environment's overrides) is valid; else `main` prints
    the ConfigurationError (file, key, reason) and exits 2."""
    path = args.config or args.file
    if path is None or (args.config and args.file and args.config != args.file):
        print("error: name one config file: `gateway config check FILE` (or --config FILE)", file=sys.stderr)
        return 2
    cfg = config_mod.load(path)
    print(f"{path}: ok (mode={cfg.server.mode}, port={cfg.server.port}, "
          f"fsync_interval_us={cfg.wal.fsync_interval_us}, batch_records_max={cfg.wal.batch_records_max}, "
          f"worker={'on' if cfg.worker.enabled else 'off'}, psps={','.join(cfg.psp.psps)}, "
          f"psp_url={cfg.psp.url or 'in-process'})")
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    if cfg.server.mode != "cluster":
        store = _open_store(_data_dir(args, cfg))
        where = str(_data_dir(args, cfg) / "gateway.db")
    else:
        store = open_postgres(cfg)
        where = f"PostgreSQL schema {cfg.cluster.database_schema}"
    try:
        version = store.migrate()
    finally:
        store.close()
    print(f"{where}: schema version {version}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.runtime.cluster_worker import run_worker

    cfg = config_mod.load(args.config)
    if cfg.server.mode != "cluster":
        print("error: `gateway worker` consumes Kafka: it needs server.mode = \"cluster\"", file=sys.stderr)
        return 2
    logs.setup(cfg.log.level, cfg.log.format)
    return run_worker(cfg, args.metrics_port)


def cmd_psp_sim(args: argparse.Namespace) -> int:
    """The profiles, seed and time scale are the config's `[psp]` section; each flag given wins over it."""
    from gateway.psp_sim.http import serve

    cfg = config_mod.load(args.config)
    flags = {"psps": args.psp, "seed": args.seed, "time_scale": args.time_scale}
    try:
        psp = msgspec.convert({**msgspec.to_builtins(cfg.psp), **{k: v for k, v in flags.items() if v is not None}},
                              config_mod.PSPConfig)
    except msgspec.ValidationError as e:
        print(f"error: psp-sim: {e}", file=sys.stderr)
        return 2
    if not 1 <= args.transactions_max <= 100_000_000:
        print("error: --transactions-max must be 1..100000000", file=sys.stderr)
        return 2
    print(f"psp-sim: serving {', '.join(psp.psps)} on http://{args.host}:{args.port}", flush=True)
    serve(args.host, args.port, list(psp.psps), seed=psp.seed, time_scale=psp.time_scale,
          transactions_max=args.transactions_max)
    return 0


def cmd_ledger_check(args: argparse.Namespace) -> int:
    from gateway.domain import ledger
    from gateway.store.processing import ProcessingStore

    cfg = config_mod.load(args.config)
    store: SqliteStore | PostgresStore
    if cfg.server.mode == "cluster":
        store = open_postgres(cfg)  # the cluster's source of truth, written by every worker
    else:
        db = _data_dir(args, cfg) / "gateway.db"
        if not db.exists():
            print(f"error: no store at {db}", file=sys.stderr)
            return 2
        store = _open_store(db.parent)
    try:
        postings, violations = ProcessingStore(store).all_postings()
    finally:
        store.close()
    violations += ledger.check(postings)
    for v in violations:
        print(json.dumps({"code": v.code, "message": v.message, "payment_id": v.payment_id, "currency": v.currency}))
    print(f"ledger check: {len(postings)} postings, {len(violations)} violations",
          file=sys.stderr if violations else sys.stdout)
    return 1 if violations else 0


SETTLEMENT_FETCH_TIMEOUT_S = 30.0


def _reconcile_store(args: argparse.Namespace) -> SqliteStore | PostgresStore | None:
    """The configured mode's store, migrated (the runs table may be new); None (after an error) when
    embedded mode has no store under the data dir."""
    cfg = config_mod.load(args.config)
    if cfg.server.mode == "cluster":
        store = open_postgres(cfg)
        store.migrate()
        return store
    db = _data_dir(args, cfg) / "gateway.db"
    if not db.exists():
        print(f"error: no store at {db}", file=sys.stderr)
        return None
    return _open_store(db.parent)


def cmd_reconcile_settlement(args: argparse.Namespace) -> int:
    """Exit 0: every line matched; 1: discrepancies; 2: the file (or the command) is unusable."""
    from datetime import date

    from gateway.domain import settlement as st
    from gateway.processing import reconcile as rc

    path = Path(args.file)
    if not st.PSP_NAME.match(args.psp):
        print(f"error: invalid --psp {args.psp!r}", file=sys.stderr)
        return 2
    try:
        size = path.stat().st_size
    except OSError as e:
        print(f"error: {path}: {e.strerror}", file=sys.stderr)
        return 2
    if size > st.SETTLEMENT_FILE_BYTES_MAX:
        print(f"error: {path}: file is {size} bytes, more than settlement_file_bytes_max="
              f"{st.SETTLEMENT_FILE_BYTES_MAX}", file=sys.stderr)
        return 2
    if args.date:
        try:
            day = date.fromisoformat(args.date)
        except ValueError:
            print(f"error: --date {args.date!r} is not YYYY-MM-DD", file=sys.stderr)
            return 2
    else:
        found = st.settlement_day_of(path)
        if found is None:
            print(f"error: {path}: cannot tell the settlement day from the file name; pass --date YYYY-MM-DD",
                  file=sys.stderr)
            return 2
        day = found
    if not 1 <= len(args.actor) <= st.ACTOR_CHARS_MAX:
        print(f"error: --actor must be 1..{st.ACTOR_CHARS_MAX} characters", file=sys.stderr)
        return 2
    data = path.read_bytes()
    store = _reconcile_store(args)
    if store is None:
        return 2
    try:
        run = rc.reconcile(store, args.psp, data, file_name=path.name, day=day, actor=args.actor,
                           apply_fee_corrections=args.apply_fee_corrections, force=args.force)
    except st.SettlementFileError as e:
        if args.json:
            print(json.dumps({"error": {"file": str(path), "line": e.line, "message": e.reason}}))
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.json:
        print(json.dumps({**run.report, "existing_run": run.existing}, indent=2))
    else:
        print(rc.format_report(run.report, existing=run.existing))
    return 0 if run.ok else 1


def cmd_reconcile_fetch(args: argparse.Namespace) -> int:
    """Downloads a settlement file from a PSP simulator served by `gateway psp-sim`."""
    from datetime import date

    import httpx

    from gateway.domain import settlement as st

    try:
        day = date.fromisoformat(args.date)
    except ValueError:
        print(f"error: --date {args.date!r} is not YYYY-MM-DD", file=sys.stderr)
        return 2
    if not st.PSP_NAME.match(args.psp):
        print(f"error: invalid --psp {args.psp!r}", file=sys.stderr)
        return 2
    base = args.psp_url or config_mod.load(None).psp.url or "http://127.0.0.1:8700"
    url = f"{base.rstrip('/')}/v1/{args.psp}/settlement/{day.isoformat()}.csv"
    out = Path(args.out or f"{args.psp}-{day.isoformat()}.csv")
    body = bytearray()
    try:
        with httpx.stream("GET", url, timeout=SETTLEMENT_FETCH_TIMEOUT_S) as r:
            if r.status_code != 200:
                print(f"error: GET {url}: HTTP {r.status_code}", file=sys.stderr)
                return 2
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > st.SETTLEMENT_FILE_BYTES_MAX:
                    print(f"error: GET {url}: more than settlement_file_bytes_max={st.SETTLEMENT_FILE_BYTES_MAX}",
                          file=sys.stderr)
                    return 2
    except httpx.HTTPError as e:
        print(f"error: GET {url}: {e}", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(bytes(body))
    tmp.replace(out)
    lines = max(0, body.count(b"\n") - 1)
    print(f"{out}: {lines} lines from {url}")
    return 0


def cmd_reconcile_runs(args: argparse.Namespace) -> int:
    from gateway.processing import reconcile as rc
    from gateway.store.processing import ProcessingStore

    store = _reconcile_store(args)
    if store is None:
        return 2
    try:
        for run in rc.runs(ProcessingStore(store), args.psp, args.limit):
            print(json.dumps(run))
    finally:
        store.close()
    return 0


def _command_group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The subcommands of `gateway <name>` (one of them is required; its name is in `<name>_command`)."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)


def _store_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a command that opens the store: the embedded one in `--data-dir`, or the one that
    `--config` names (PostgreSQL in cluster mode)."""
    p.add_argument("--data-dir")
    p.add_argument("--config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="High-performance payment gateway")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the merchant HTTP API")
    s.add_argument("--config", help="TOML config file (default: built-in defaults)")
    s.add_argument("--data-dir", help="folder for the WAL and the embedded store")
    s.add_argument("--port", type=int)
    s.add_argument("--host")
    s.add_argument("--workers", type=int)
    s.add_argument("--demo", action="store_true", help=f"create the demo merchant (key {DEMO_API_KEY})")
    s.set_defaults(func=cmd_serve)

    msub = _command_group(sub, "merchant", "manage merchants")
    mc = msub.add_parser("create", help="create a merchant and print its API key once")
    mc.add_argument("--name", required=True)
    _store_flags(mc)
    mc.add_argument("--api-key", help=argparse.SUPPRESS)
    mc.add_argument("--rate-limit-per-s", type=float)
    mc.add_argument("--rate-limit-burst", type=float)
    mc.set_defaults(func=cmd_merchant_create)
    from gateway.api.merchant_cli import add_parsers as add_merchant_parsers

    add_merchant_parsers(msub, _store_flags, _open_configured_store)  # list, show, update, rotate-key, ...

    csub = _command_group(sub, "config", "config file tools")
    cc = csub.add_parser("check", help="validate a config file (with the GATEWAY_* overrides); exit 2 on an error")
    cc.add_argument("file", nargs="?", help="TOML config file")
    cc.add_argument("--config", help="the same, as an option")
    cc.set_defaults(func=cmd_config_check)

    dbsub = _command_group(sub, "db", "database tools")
    dm = dbsub.add_parser("migrate", help="apply pending schema migrations (PostgreSQL in cluster mode)")
    dm.add_argument("--config", required=True)
    dm.add_argument("--data-dir")
    dm.set_defaults(func=cmd_db_migrate)

    wk = sub.add_parser("worker", help="cluster mode: consume the payments topic into PostgreSQL")
    wk.add_argument("--config", required=True)
    wk.add_argument("--metrics-port", type=int, default=None,
                    help="serve /metrics on this port (default [metrics] worker_port; 0: none)")
    wk.set_defaults(func=cmd_worker)

    ps = sub.add_parser("psp-sim", help="serve the simulated PSPs over HTTP")
    ps.add_argument("--host", default="127.0.0.1")
    ps.add_argument("--port", type=int, default=8700)
    ps.add_argument("--config", help="TOML config file: its [psp] section gives the defaults of the flags below")
    ps.add_argument("--psp", action="append", choices=config_mod.PSP_PROFILE_NAMES,
                    help="profile (repeatable; default: psp.psps)")
    ps.add_argument("--seed", type=int, help="default: psp.seed")
    ps.add_argument("--time-scale", type=float, help="multiplies every simulated duration (default: psp.time_scale)")
    ps.add_argument("--transactions-max", type=int, default=100_000)
    ps.set_defaults(func=cmd_psp_sim)

    lgsub = _command_group(sub, "ledger", "ledger tools")
    lc = lgsub.add_parser("check", help="check every stored posting (SQLite, or PostgreSQL in cluster mode); "
                          "exit 1 on any violation")
    _store_flags(lc)
    lc.set_defaults(func=cmd_ledger_check)

    rcsub = _command_group(sub, "reconcile", "reconcile PSP settlement files with the ledger")
    rs = rcsub.add_parser("settlement", help="match a PSP settlement CSV against our captures, refunds and "
                          "ledger; exit 0 all matched, 1 discrepancies, 2 bad file")
    rs.add_argument("--psp", required=True, help="the PSP that produced the file (psp_a, ...)")
    rs.add_argument("--file", required=True, help="settlement CSV: reference,amount,currency,fee,net,status")
    rs.add_argument("--date", help="settlement day YYYY-MM-DD (default: the date in the file name)")
    _store_flags(rs)
    rs.add_argument("--json", action="store_true", help="print the report as JSON")
    rs.add_argument("--apply-fee-corrections", action="store_true",
                    help="post a balanced correction for every capture whose settled fee differs from the booked one")
    rs.add_argument("--force", action="store_true", help="run again a file already reconciled (same SHA-256)")
    rs.add_argument("--actor", default=os.environ.get("USER") or "operator", help="who runs it (audit log)")
    rs.set_defaults(func=cmd_reconcile_settlement)
    rf = rcsub.add_parser("fetch", help="download a settlement file from `gateway psp-sim`")
    rf.add_argument("--psp", required=True)
    rf.add_argument("--date", required=True, help="YYYY-MM-DD (UTC)")
    rf.add_argument("--psp-url", help="default: psp.url of the defaults (GATEWAY_PSP_URL), else http://127.0.0.1:8700")
    rf.add_argument("--out", help="default: <psp>-<date>.csv")
    rf.set_defaults(func=cmd_reconcile_fetch)
    rr = rcsub.add_parser("runs", help="list stored reconciliation runs, newest first (JSON lines)")
    rr.add_argument("--psp")
    rr.add_argument("--limit", type=int, default=20, choices=range(1, 1001), metavar="1..1000")
    _store_flags(rr)
    rr.set_defaults(func=cmd_reconcile_runs)

    from gateway.risk.cli import add_parsers as add_risk_parsers

    add_risk_parsers(sub)  # `gateway rules ...`, `gateway lists ...`: the risk admin API
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except config_mod.ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
