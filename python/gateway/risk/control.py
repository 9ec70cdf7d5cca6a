"""The risk control plane: versioned rulesets, persisted lists, the model and shadow mode.

The Rust engine (`FastPath.risk`, a `RiskEngine`) holds what is live; the store (`gateway.store.risk`:
`risk_rulesets`, `risk_lists`, `risk_list_entries`, `risk_audit`, migration 3) holds what must survive
a restart and the history of who changed what. Every change goes the same way:

1. validate and compile first (`check_rules`): a bad ruleset changes nothing and reports every error;
2. write the new version in a store transaction (`RiskStore.change`);
3. swap it into the engine (atomic: a request sees the old or the new ruleset, never half of one);
4. commit. If the swap fails the transaction is rolled back, so the store never names a version the
   engine refused.

Versions are one sequence over every slot (global, each merchant, shadow) and are never reused or
rewritten: a rollback is a new version whose source is the old one (`operation = 'rollback'`,
`rollback_of` = the version restored), so the history reads as what was live when, and by whom.
Clearing a merchant ruleset or the shadow ruleset is a version with no source (`operation = 'clear'`).

Cluster mode: the same tables live in PostgreSQL, behind the same store (one advisory lock serialises
changes across processes). After each commit the change is published on the risk channel and every
process, the author included, applies it to its own engine (`apply_update`): rulesets are re-read from
the store and swapped (compiled before the swap), list changes are applied as far as the store still
agrees with them (`gateway.risk.sync`). `poll` also runs every few seconds, so a lost message cannot
leave a process on an old ruleset (`sync_rules`) or an old list (`sync_lists`); a restart restores
everything from the store. Backtests: `gateway.risk.backtest` (re-exported here).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway._fastpath import RiskEngine, RiskListError, RulesError
from gateway.risk.backtest import (
    ACTIONS,
    backtest,
    backtest_engine,
    backtest_log,
    payload_risk_request,
    risk_request,
)
from gateway.risk.base import (
    AUDIT_VALUES_MAX,
    AUTHOR_CHARS_MAX,
    CHUNK_VALUES,
    COMMENT_CHARS_MAX,
    LIST_KINDS,
    LIST_REPAIR_ROWS_MAX,
    LIST_REPAIR_VALUES_MAX,
    SHIPPED_MODEL,
    SOURCE_BYTES_MAX,
    VALUE_BYTES_MAX,
    ControlError,
    RulesetVersion,
    RulesInvalid,
    check_text,
    chunks,
    normalize,
    rules_invalid,
    ruleset_from_row,
)
from gateway.risk.sync import ListSync
from gateway.store.risk import PG_LOCK_ID, RiskStore
from gateway.store.sql import now_ms

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from gateway.store.postgres import PostgresStore
    from gateway.store.sqlite import SqliteStore

log = logging.getLogger("gateway.risk")


class RiskControl:
    """One per gateway process; serialises control-plane changes with a lock of its own."""

    def __init__(self, store: SqliteStore | PostgresStore, engine: RiskEngine, model_path: Path,
                 pg_pool: ConnectionPool | None = None,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Embedded mode: `store` is the SQLite store. Cluster mode: `store` is the PostgreSQL store,
        `pg_pool` its pool (it says the mode, and must agree with the store) and `publish` sends a committed
        change to every process."""
        self._store = store
        self.engine = engine
        self.model_path = model_path
        self.model_bytes: bytes | None = None
        self._lock = threading.RLock()
        self._rs = RiskStore(store)
        if (pg_pool is not None) != self._rs.pg:
            raise ValueError("pg_pool (the PostgreSQL store's pool) is given in cluster mode, and only then")
        self._publish_fn = publish
        # The version installed in the engine per slot (scope, merchant_id).
        self._installed: dict[tuple[str, str], int] = {}
        self._lists = ListSync(engine, self._rs)

    @property
    def clustered(self) -> bool:
        return self._rs.pg

    @property
    def store(self) -> SqliteStore:
        """Embedded mode's SQLite store (cluster mode has none: AttributeError; see `risk_store`)."""
        from gateway.store.sqlite import SqliteStore

        if not isinstance(self._store, SqliteStore):
            raise AttributeError("cluster mode has no SQLite store; see risk_store")  # noqa: TRY004
        return self._store

    @property
    def risk_store(self) -> RiskStore:
        """The control plane's store, in either mode, as `backtest_engine` takes it."""
        return self._rs

    @property
    def db(self) -> RiskStore | None:
        """Cluster mode's store of the control plane (None in embedded mode), as `backtest_engine` takes it."""
        return self._rs if self._rs.pg else None

    @property
    def list_drift(self) -> dict[str, int]:
        """Lists found holding more entries than the store after a repair (see `sync_lists`)."""
        return self._lists.drift

    def _publish(self, message: dict[str, Any]) -> None:
        """After a commit: tell every process (cluster mode). A lost message is repaired by the
        periodic `sync_rules` (rulesets) and by the restore at start."""
        if self._publish_fn is None:
            return
        try:
            self._publish_fn({**message, "origin": os.getpid()})
        except Exception as e:  # noqa: BLE001 - committed anyway; the other processes catch up by polling
            log.warning("risk update not published (%s): %s", message.get("kind"), e)

    # -- start-up ----------------------------------------------------------------------------------

    def restore(self) -> dict[str, Any]:
        """Loads the model, the lists and the active rulesets into the engine (lists before rules: rules
        compile against the lists they name)."""
        with self._lock:
            model_hash = self._load_model_file()
            lists, entries = self._lists.restore()
            active = self.active()
            for rv in active:
                self._install(rv)
            for rv in self._latest():
                self._installed.setdefault((rv.scope, rv.merchant_id or ""), rv.version)
        summary = {"model_hash": model_hash, "lists": lists, "entries": entries,
                   "rulesets": [(rv.scope, rv.merchant_id, rv.version) for rv in active]}
        log.info("risk control plane restored: %s", summary)
        return summary

    def _load_model_file(self) -> str:
        data = self.model_path.read_bytes()
        model_hash = self.engine.load_model(data)
        self.model_bytes = data
        return model_hash

    def reload_model(self, actor: str) -> str:
        with self._lock:
            try:
                model_hash = self._load_model_file()
            except (OSError, ValueError) as e:
                raise ControlError(422, "model_invalid", f"The model could not be loaded: {e}") from None
            with self._rs.change(lock=False) as tx:
                tx.audit(actor, "model.reload", "model", {"path": str(self.model_path), "model_hash": model_hash})
        self._publish({"kind": "model"})
        return model_hash

    # -- rulesets ----------------------------------------------------------------------------------

    def check(self, source: str) -> int:
        """Number of rules of a valid ruleset; RulesInvalid with every located error otherwise."""
        if len(source.encode()) > SOURCE_BYTES_MAX:
            raise ControlError(400, "parameter_invalid", f"source is larger than {SOURCE_BYTES_MAX} bytes.", "source")
        try:
            return self.engine.check_rules(source)
        except RulesError as e:
            raise rules_invalid(e) from None

    def _install(self, rv: RulesetVersion) -> None:
        if rv.scope == "global":
            self.engine.set_rules(rv.source or "", rv.version)
        elif rv.scope == "merchant":
            assert rv.merchant_id is not None
            self.engine.set_merchant_rules(rv.merchant_id, rv.source, rv.version)
        else:
            self.engine.set_shadow_rules(rv.source, rv.version)
        self._installed[(rv.scope, rv.merchant_id or "")] = rv.version

    def _latest(self) -> list[RulesetVersion]:
        """The newest version of every slot, cleared ones included."""
        return list(map(ruleset_from_row, self._rs.newest_rulesets()))

    def sync_rules(self) -> list[int]:
        """Installs every slot whose newest stored version is not the one in the engine (lists first, so
        the rules compile); returns the versions installed. Each swap is atomic, compiled before it."""
        with self._lock:
            self._lists.sync_names()
            done = []
            for rv in self._latest():
                if self._installed.get((rv.scope, rv.merchant_id or ""), 0) >= rv.version:
                    continue
                try:
                    self._install(rv)
                except RulesError as e:
                    log.error("risk ruleset version %d does not compile here: %s", rv.version, e)
                    continue
                done.append(rv.version)
        if done:
            log.info("risk rules synced from the store by pid %d: versions %s", os.getpid(), done)
        return done

    def poll(self) -> None:
        """The periodic check of cluster mode: a newer stored ruleset version than any installed one, or
        a list whose stored version is not the one this engine is reconciled to, means a missed message."""
        if self._rs.max_version() > max(self._installed.values(), default=0):
            self.sync_rules()
        self.sync_lists()

    def sync_lists(self) -> list[str]:
        """Repairs every list whose stored version differs from the one this engine holds; returns their
        names (`gateway.risk.sync`: values are added before stale ones are removed)."""
        with self._lock:
            return self._lists.sync()

    def start_polling(self, interval_s: float) -> threading.Event:
        """A daemon thread that calls `poll` every `interval_s`; set the returned event to stop it."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                try:
                    self.poll()
                except Exception as e:  # noqa: BLE001 - a store or pool error; tried again next tick
                    if not stop.is_set():
                        log.warning("risk version check failed: %s", e)

        threading.Thread(target=run, name="risk-poll", daemon=True).start()
        return stop

    def apply_update(self, message: object) -> None:
        """A change published by some process (this one included): apply it to this engine."""
        if not isinstance(message, dict):
            return
        kind = message.get("kind")
        with self._lock:
            if kind == "list":
                values = [v for v in message.get("values") or () if isinstance(v, str)]
                self._lists.apply(str(message.get("op")), str(message.get("name", "")), values)
            elif kind == "model":
                self._load_model_file()
            self.sync_rules()

    def _record(self, scope: str, merchant_id: str | None, source: str | None, author: str, comment: str,
                operation: str, rollback_of: int | None = None) -> RulesetVersion:
        check_text(author, "author", AUTHOR_CHARS_MAX)
        check_text(comment, "comment", COMMENT_CHARS_MAX)
        if not author:
            raise ControlError(400, "parameter_missing", "author must not be empty.", "author")
        with self._lock, self._rs.change() as tx:
            rv = RulesetVersion(tx.next_version(), scope, merchant_id, source, author, comment, operation,
                                rollback_of, now_ms())
            tx.insert_ruleset(rv.row())
            try:
                self._install(rv)  # compiles again against the lists of this instant, then swaps
            except RulesError as e:
                raise rules_invalid(e) from None
        log.info("risk rules %s: version %d (%s%s) by %s", operation, rv.version, scope,
                 f" {merchant_id}" if merchant_id else "", author)
        self._publish({"kind": "rules", "version": rv.version})
        return rv

    def push(self, source: str, *, author: str, comment: str = "", merchant_id: str | None = None,
             shadow: bool = False) -> RulesetVersion:
        if shadow and merchant_id:
            raise ControlError(400, "parameter_invalid",
                               "Shadow mode runs a candidate global ruleset; merchant_id cannot be given.",
                               "merchant_id")
        self.check(source)
        scope = "shadow" if shadow else "merchant" if merchant_id else "global"
        return self._record(scope, merchant_id, source, author, comment, "push")

    def clear(self, *, author: str, comment: str = "", merchant_id: str | None = None) -> RulesetVersion:
        """Removes the shadow ruleset (no merchant) or a merchant's ruleset; the global one cannot be
        cleared (push an empty ruleset instead)."""
        scope = "merchant" if merchant_id else "shadow"
        return self._record(scope, merchant_id, None, author, comment, "clear")

    def rollback(self, version: int, *, author: str, comment: str = "") -> RulesetVersion:
        row = self._rs.ruleset(version)
        if row is None:
            raise ControlError(404, "resource_missing", f"No such ruleset version: {version}", "version")
        old = ruleset_from_row(row)
        return self._record(old.scope, old.merchant_id, old.source, author,
                            comment or f"rollback to version {version}", "rollback", rollback_of=version)

    def history(self, scope: str | None = None, merchant_id: str | None = None, limit: int = 100,
                before: int | None = None) -> list[dict[str, Any]]:
        active = {rv.version for rv in self.active()}
        rows = self._rs.rulesets(scope, merchant_id, limit, before)
        return [{**msgspec.structs.asdict(ruleset_from_row(r)), "active": r[0] in active} for r in rows]

    def active(self) -> list[RulesetVersion]:
        """The newest version of every slot that is not cleared, global first."""
        return [rv for rv in self._latest() if rv.source is not None]

    def shadow_stats(self) -> dict[str, Any]:
        return dict(json.loads(self.engine.shadow_stats_json()))

    # -- lists -------------------------------------------------------------------------------------

    def _list_kind(self, name: str) -> str:
        kind = self._rs.list_kind(name)
        if kind is None:
            raise ControlError(404, "resource_missing", f"No such list: @{name}", "name")
        return kind

    def _values(self, kind: str, values: list[str]) -> list[str]:
        out = []
        for v in values:
            if not isinstance(v, str) or not v or len(v.encode()) > VALUE_BYTES_MAX:
                raise ControlError(400, "parameter_invalid",
                                   f"List values are strings of 1 to {VALUE_BYTES_MAX} bytes.", "values")
            out.append(normalize(kind, v))
        return list(dict.fromkeys(out))

    def create_list(self, name: str, kind: str, entries_max: int | None, actor: str) -> dict[str, Any]:
        with self._lock, self._rs.change() as tx:
            if tx.list_exists(name):
                raise ControlError(409, "list_exists", f"List @{name} already exists.", "name")
            try:
                self.engine.create_list(name, kind, entries_max)
            except RiskListError as e:
                raise ControlError(400, "list_invalid", str(e), "name") from None
            tx.insert_list(name, kind, entries_max, actor)
            tx.audit(actor, "list.create", f"@{name}", {"kind": kind, "entries_max": entries_max})
        self._publish({"kind": "list", "op": "create", "name": name})
        return self.get_list(name, 0)

    def _change(self, name: str, values: list[str], actor: str, op: str) -> int:
        """Adds or removes values in the store and in the engine, all or nothing."""
        kind = self._list_kind(name)
        vals = self._values(kind, values)
        with self._lock, self._rs.change() as tx:
            before = tx.present(name, vals) if op == "add" else set()
            if op == "add":
                tx.add_entries(name, vals)
            else:
                tx.remove_entries(name, vals)
            done = 0
            try:
                for chunk in chunks(iter(vals)):
                    done += self.engine.list_add(name, chunk) if op == "add" else self.engine.list_remove(name, chunk)
            except RiskListError as e:
                # The engine took part of the batch before refusing (a full list): take back what is new,
                # so that the engine and the rolled-back store agree.
                if op == "add":
                    self.engine.list_remove(name, [v for v in vals if v not in before])
                code = "list_full" if "full" in str(e) else "list_invalid"
                raise ControlError(422, code, str(e), "values") from None
            tx.audit(actor, f"list.{op}", f"@{name}",
                     {"count": len(vals), "changed": done, "values": vals[:AUDIT_VALUES_MAX],
                      "values_truncated": len(vals) > AUDIT_VALUES_MAX})
        for i in range(0, len(vals), CHUNK_VALUES):
            self._publish({"kind": "list", "op": op, "name": name, "values": vals[i:i + CHUNK_VALUES]})
        return done

    def list_add(self, name: str, values: list[str], actor: str) -> int:
        return self._change(name, values, actor, "add")

    def list_remove(self, name: str, values: list[str], actor: str) -> int:
        return self._change(name, values, actor, "remove")

    def list_load(self, name: str, values: list[str], actor: str) -> tuple[int, int]:
        """Makes the list hold exactly `values`: adds the new ones, removes the others."""
        kind = self._list_kind(name)
        wanted = set(self._values(kind, values))
        current = set(self._rs.list_values(name))
        stale = sorted(current - wanted)
        removed = self.list_remove(name, stale, actor) if stale else 0
        fresh = sorted(wanted - current)
        added = self.list_add(name, fresh, actor) if fresh else 0
        return added, removed

    def get_list(self, name: str, limit: int = 100, after: str = "") -> dict[str, Any]:
        row = self._rs.list_info(name)
        if row is None:
            raise ControlError(404, "resource_missing", f"No such list: @{name}", "name")
        count = self._rs.list_count(name)
        values = self._rs.list_page(name, after, limit)
        live = next((x for x in json.loads(self.engine.lists_json()) if x["name"] == name), None)
        return {"name": name, "kind": row[0], "entries_max": row[1], "author": row[2], "created_ms": row[3],
                "entries": count, "values": values, "has_more": len(values) == limit and count > len(values),
                "engine": live}

    def lists(self) -> list[dict[str, Any]]:
        stored = self._rs.entry_counts()
        return [{**x, "stored_entries": stored.get(x["name"])} for x in json.loads(self.engine.lists_json())]

    def audit(self, target: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._rs.audit(target, limit)
        return [{"id": r[0], "at_ms": r[1], "actor": r[2], "action": r[3], "target": r[4],
                 "detail": json.loads(r[5])} for r in rows]


__all__ = [
    "ACTIONS",
    "AUDIT_VALUES_MAX",
    "AUTHOR_CHARS_MAX",
    "CHUNK_VALUES",
    "COMMENT_CHARS_MAX",
    "LIST_KINDS",
    "LIST_REPAIR_ROWS_MAX",
    "LIST_REPAIR_VALUES_MAX",
    "PG_LOCK_ID",
    "SHIPPED_MODEL",
    "SOURCE_BYTES_MAX",
    "VALUE_BYTES_MAX",
    "ControlError",
    "RiskControl",
    "RulesInvalid",
    "RulesetVersion",
    "backtest",
    "backtest_engine",
    "backtest_log",
    "normalize",
    "payload_risk_request",
    "risk_request",
    "rules_invalid",
]
