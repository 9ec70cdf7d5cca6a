"""`gateway merchant list|show|update|rotate-key|revoke-key|audit`: merchants managed live.

The commands write the store of the mode (`--data-dir DIR`: the embedded SQLite store; `--config FILE`:
PostgreSQL in cluster mode) through store/merchants.py, the same operations as the admin API
(api/merchant_admin.py). They work while `gateway serve` runs on the same data dir or cluster: every
gateway process sees the change within `[merchants] refresh_ms`. Output is JSON on stdout; an error
is one line on stderr and exit status 1 (2 for a usage error). `--actor` names who made the change in
the audit trail (default: the login name).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from gateway import config as config_mod
from gateway.store.merchants import MerchantAdmin, MerchantError

OpenStore = Callable[[argparse.Namespace, config_mod.Config], Any]


def _actor(args: argparse.Namespace) -> str:
    if args.actor:
        return str(args.actor)
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _run(args: argparse.Namespace, open_store: OpenStore, fn: Callable[[MerchantAdmin, config_mod.Config], Any]) -> int:
    cfg = config_mod.load(args.config)
    store = open_store(args, cfg)
    try:
        out = fn(MerchantAdmin(store), cfg)
    except MerchantError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(out))
    return 0


def add_parsers(msub: Any, store_flags: Callable[[argparse.ArgumentParser], None], open_store: OpenStore) -> None:
    """Adds the commands to the `gateway merchant` group (`store_flags`: --data-dir and --config)."""

    def command(name: str, help_text: str, fn: Callable[[argparse.Namespace], Callable[..., Any]],
                *, merchant: bool = True, actor: bool = False) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = msub.add_parser(name, help=help_text)
        if merchant:
            p.add_argument("merchant_id")
        store_flags(p)
        if actor:
            p.add_argument("--actor", help="who makes the change, for the audit trail (default: cli:<login>)")
        p.set_defaults(func=lambda args: _run(args, open_store, fn(args)))
        return p

    command("list", "print every merchant as a JSON array (id, name, rate limits, key prefixes; never a key)",
            lambda a: lambda admin, _cfg: admin.all(), merchant=False)
    command("show", "print one merchant with the state of each of its keys",
            lambda a: lambda admin, _cfg: admin.show(a.merchant_id))
    up = command("update", "change a merchant's name or rate limit (live)",
                 lambda a: lambda admin, _cfg: admin.update(a.merchant_id, _actor(a), name=a.name,
                                                            rate_limit_per_s=a.rate_limit_per_s,
                                                            rate_limit_burst=a.rate_limit_burst), actor=True)
    up.add_argument("--name")
    up.add_argument("--rate-limit-per-s", type=float)
    up.add_argument("--rate-limit-burst", type=float)

    def rotate(a: argparse.Namespace) -> Callable[[MerchantAdmin, config_mod.Config], Any]:
        def run(admin: MerchantAdmin, cfg: config_mod.Config) -> dict[str, Any]:
            overlap = cfg.merchants.key_overlap_s if a.overlap_s is None else a.overlap_s
            key, merchant = admin.rotate_key(a.merchant_id, _actor(a), overlap)
            # The only place the new key is ever shown: to the operator who rotated it.
            return {"id": merchant["id"], "api_key": key.expose()}
        return run

    rk = command("rotate-key", "issue a new API key; the old ones keep working for the overlap window", rotate,
                 actor=True)
    rk.add_argument("--overlap-s", type=int, help="seconds the old keys keep working (default [merchants] key_overlap_s)")
    rv = command("revoke-key", "stop one of the merchant's keys now",
                 lambda a: lambda admin, _cfg: admin.revoke_key(a.merchant_id, _actor(a), a.key), actor=True)
    rv.add_argument("--key", required=True, help="the key to revoke (it is hashed, never stored or printed)")
    au = command("audit", "print the merchant's audit trail, newest first (who, when, what)",
                 lambda a: lambda admin, _cfg: admin.audit(a.merchant_id, a.limit))
    au.add_argument("--limit", type=int, default=100)
