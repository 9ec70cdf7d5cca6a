"""The risk control plane: versioned rulesets, persisted lists, the model, shadow mode and backtests.

The Rust engine (`FastPath.risk`, a `RiskEngine`) holds what is live; SQLite (`risk_rulesets`,
`risk_lists`, `risk_list_entries`, `risk_audit`, migration 3) holds what must survive a restart and
the history of who changed what. Every change goes the same way:

1. validate and compile first (`check_rules`): a bad ruleset changes nothing and reports every error;
2. write the new version in a SQLite transaction;
3. swap it into the engine (atomic: a request sees the old or the new ruleset, never half of one);
4. commit. If the swap fails the transaction is rolled back, so the store never names a version the
   engine refused.

Versions are one sequence over every slot (global, each merchant, shadow) and are never reused or
rewritten: a rollback is a new version whose source is the old one (`operation = 'rollback'`,
`rollback_of` = the version restored), so the history reads as what was live when, and by whom.
Clearing a merchant ruleset or the shadow ruleset is a version with no source (`operation = 'clear'`).

Cluster mode: the same tables live in PostgreSQL (`_PgDb` translates the statements below; one
advisory lock serialises changes across processes). After each commit the change is published on the
risk channel and every process, the author included, applies it to its own engine (`apply_update`):
rulesets are re-read from PostgreSQL and swapped (compiled before the swap), list changes are applied
as far as PostgreSQL still agrees with them. `poll` also runs every few seconds, so a lost message
cannot leave a process on an old ruleset (`sync_rules`) or an old list (`sync_lists`: a list's version is
the id of its newest audit row); a restart restores everything from PostgreSQL.

Backtests replay the durable records of an `EventLog` (gateway.feed.eventlog): the local WAL in
embedded mode, the Kafka topic (every process's records) in cluster mode.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway._fastpath import RiskEngine, RiskListError, RulesError
from gateway.feed.eventlog import READ_RECORDS_MAX, TIME_MS_MAX, EventLog, EventRecord, ReadStats

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from gateway.store.sqlite import SqliteStore

log = logging.getLogger("gateway.risk")

SHIPPED_MODEL = Path(__file__).with_name("model.json")
LIST_KINDS = ("card", "bin", "email", "ip", "device", "country", "string")
VALUE_BYTES_MAX = 256
# Values an audit row keeps verbatim; its `count` is always exact.
AUDIT_VALUES_MAX = 1_000
# Entries handed to the engine per call when lists are restored or loaded.
CHUNK_VALUES = 10_000
SOURCE_BYTES_MAX = 8 * 1024 * 1024
AUTHOR_CHARS_MAX = 200
COMMENT_CHARS_MAX = 2_000
# Audit rows one list repair reads per query, and values it diffs one by one before it reloads the list.
LIST_REPAIR_ROWS_MAX = 1_000
LIST_REPAIR_VALUES_MAX = 100_000
# Cluster mode: every control-plane change takes this PostgreSQL advisory lock ("risk").
PG_LOCK_ID = 0x7269_736B


class ControlError(Exception):
    """A refused control-plane request: HTTP status, error code, message and offending parameter."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


class RulesInvalid(ControlError):
    """A ruleset that does not compile; `errors` holds every located error."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(400, "rules_invalid", message, "source")
        self.errors = errors


def rules_invalid(err: RulesError) -> RulesInvalid:
    located = [{"line": ln, "column": col, "kind": kind, "message": msg} for ln, col, kind, msg in err.args[1]]
    return RulesInvalid(str(err.args[0]), located)


class RulesetVersion(msgspec.Struct):
    version: int
    scope: str  # "global" | "merchant" | "shadow"
    merchant_id: str | None
    source: str | None
    author: str
    comment: str
    operation: str  # "push" | "rollback" | "clear"
    rollback_of: int | None
    created_ms: int


_COLUMNS = "version, scope, merchant_id, source, author, comment, operation, rollback_of, created_ms"


def _row(r: tuple[Any, ...]) -> RulesetVersion:
    return RulesetVersion(r[0], r[1], r[2] or None, r[3], r[4], r[5], r[6], r[7], r[8])


def normalize(kind: str, value: str) -> str:
    """The engine's own normalisation, applied before storing so that add and remove agree."""
    if kind == "email":
        return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in value)
    if kind == "country":
        return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in value)
    return value


def _check_text(value: str, name: str, chars_max: int) -> str:
    if len(value) > chars_max:
        raise ControlError(400, "parameter_invalid", f"{name} is longer than {chars_max} characters.", name)
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)


class RiskControl:
    """One per gateway process; serialises control-plane changes with a lock of its own."""

    def __init__(self, store: SqliteStore, engine: RiskEngine, model_path: Path,
                 pg_pool: ConnectionPool | None = None,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Embedded mode: `store` is the SQLite store. Cluster mode: `pg_pool` is the PostgreSQL pool
        (then `store` is unused) and `publish` sends a committed change to every process."""
        self.store = store
        self.engine = engine
        self.model_path = model_path
        self.model_bytes: bytes | None = None
        self._lock = threading.RLock()
        self._db = _PgDb(pg_pool) if pg_pool is not None else None
        self._publish_fn = publish
        # The version installed in the engine per slot (scope, merchant_id).
        self._installed: dict[tuple[str, str], int] = {}
        # The list version (`_list_versions`) each engine list is reconciled up to.
        self._lists_synced: dict[str, int] = {}
        # Lists found holding more entries than the store after a repair (see `sync_lists`).
        self.list_drift: dict[str, int] = {}

    @property
    def clustered(self) -> bool:
        return self._db is not None

    @property
    def db(self) -> _PgDb | None:
        """Cluster mode's PostgreSQL (None in embedded mode)."""
        return self._db

    # -- storage helpers ---------------------------------------------------------------------------

    def _conn(self) -> Any:
        return self._db if self._db is not None else self.store._conn()

    def _tx(self) -> Any:
        if self._db is not None:
            return self._db.tx()
        return _Tx(self.store._conn(), self.store._write_lock)

    def _publish(self, message: dict[str, Any]) -> None:
        """After a commit: tell every process (cluster mode). A lost message is repaired by the
        periodic `sync_rules` (rulesets) and by the restore at start."""
        if self._publish_fn is None:
            return
        try:
            self._publish_fn({**message, "origin": os.getpid()})
        except Exception as e:  # noqa: BLE001 - committed anyway; the other processes catch up by polling
            log.warning("risk update not published (%s): %s", message.get("kind"), e)

    def _audit(self, conn: sqlite3.Connection, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        conn.execute("INSERT INTO risk_audit (at_ms, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                     (_now_ms(), actor, action, target, json.dumps(detail, separators=(",", ":"))))

    # -- start-up ----------------------------------------------------------------------------------

    def restore(self) -> dict[str, Any]:
        """Loads the model, the lists and the active rulesets into the engine (lists before rules: rules
        compile against the lists they name)."""
        with self._lock:
            model_hash = self._load_model_file()
            lists = entries = 0
            conn = self._conn()
            # Versions before entries: entries read later can only be newer than the version noted.
            versions = self._list_versions()
            for name, kind, entries_max in conn.execute("SELECT name, kind, entries_max FROM risk_lists ORDER BY name"):
                try:
                    self.engine.create_list(name, kind, entries_max)
                except RiskListError:
                    pass  # already in the engine: a hook that runs twice must not fail
                lists += 1
                for chunk in _chunks(v for (v,) in self._conn().execute(
                        "SELECT value FROM risk_list_entries WHERE list_name = ?", (name,))):
                    entries += self.engine.list_add(name, chunk)
                self._lists_synced[name] = versions.get(name, 0)
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
            with self._tx() as conn:
                self._audit(conn, actor, "model.reload", "model", {"path": str(self.model_path),
                                                                   "model_hash": model_hash})
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
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM risk_rulesets r WHERE version = (SELECT max(version) FROM risk_rulesets "
            "WHERE scope = r.scope AND merchant_id = r.merchant_id) ORDER BY scope, merchant_id").fetchall()
        return list(map(_row, rows))

    def sync_rules(self) -> list[int]:
        """Installs every slot whose newest stored version is not the one in the engine (lists first, so
        the rules compile); returns the versions installed. Each swap is atomic, compiled before it."""
        with self._lock:
            self._sync_list_names()
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
        row = self._conn().execute("SELECT max(version) FROM risk_rulesets").fetchone()
        if row and row[0] and row[0] > max(self._installed.values(), default=0):
            self.sync_rules()
        self.sync_lists()

    # -- list versions -----------------------------------------------------------------------------
    #
    # A list's version is the id of its newest audit row (`risk_audit.target = '@name'`). Every list
    # change writes that row in the transaction of the change, under the control plane's lock (the
    # advisory lock in cluster mode), so the ids of one list's changes grow in commit order: a durable
    # change counter that needs no table of its own. The audit rows also say what changed (the values,
    # verbatim up to AUDIT_VALUES_MAX per row), so a missed change is repaired by replaying the rows
    # after the version the engine holds, against what the store holds now.

    def _list_versions(self) -> dict[str, int]:
        """The stored version of every list (one index probe per list: `risk_audit_by_target`)."""
        rows = self._conn().execute(
            "SELECT l.name, (SELECT max(a.id) FROM risk_audit a WHERE a.target = '@' || l.name) FROM risk_lists l"
        ).fetchall()
        return {name: int(v or 0) for name, v in rows}

    def sync_lists(self) -> list[str]:
        """Repairs every list whose stored version differs from the one this engine holds; returns their
        names. Values are added before stale ones are removed, so a value that stays listed is listed
        at every instant (a blocklist never opens while it is repaired)."""
        with self._lock:
            self._sync_list_names()
            repaired = []
            for name, version in self._list_versions().items():
                if self._lists_synced.get(name, 0) != version:
                    self._repair_list(name, self._lists_synced.get(name, 0), version)
                    repaired.append(name)
        return repaired

    def _repair_list(self, name: str, synced: int, version: int) -> None:
        conn = self._conn()
        added: set[str] = set()
        removed: set[str] = set()
        reload_all = False
        after = synced
        while True:
            rows = conn.execute(
                "SELECT id, action, detail FROM risk_audit WHERE target = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (f"@{name}", after, version, LIST_REPAIR_ROWS_MAX)).fetchall()
            for _, action, detail in rows:
                d = json.loads(detail)
                values = [v for v in d.get("values") or () if isinstance(v, str)]
                if action == "list.add":
                    added.update(values)
                    reload_all |= bool(d.get("values_truncated"))
                elif action == "list.remove":
                    removed.update(values)
            if len(rows) < LIST_REPAIR_ROWS_MAX:
                break
            after = rows[-1][0]
            if len(added) + len(removed) > LIST_REPAIR_VALUES_MAX:
                # Too many to diff value by value: take the whole stored list again; removals in the rows
                # not read are found by the count check below.
                reload_all = True
                break
        candidates = sorted(added | removed)
        stored = _present(conn, name, candidates) if candidates else set()
        if reload_all:
            fresh = (v for (v,) in conn.execute("SELECT value FROM risk_list_entries WHERE list_name = ?", (name,)))
        else:
            fresh = (v for v in candidates if v in stored)
        n_added = sum(self.engine.list_add(name, chunk) for chunk in _chunks(fresh))
        stale = [v for v in candidates if v not in stored]
        n_removed = sum(self.engine.list_remove(name, chunk) for chunk in _chunks(stale))
        self._lists_synced[name] = version
        count = conn.execute("SELECT count(*) FROM risk_list_entries WHERE list_name = ?", (name,)).fetchone()
        live = next((x for x in json.loads(self.engine.lists_json()) if x["name"] == name), None)
        have, want = (live or {}).get("entries"), count[0] if count else 0
        if self._list_versions().get(name, 0) != version:
            pass  # changed again meanwhile: the counts may disagree for that reason; the next poll checks
        elif have is not None and have > want:
            # A removal of more values than its audit row names, missed: the values are unknown here.
            self.list_drift[name] = have - want
            log.error("risk list @%s holds %d entries in pid %d and %d in the store after a repair; a restart "
                      "reloads it", name, have, os.getpid(), want)
        else:
            self.list_drift.pop(name, None)
        if n_added or n_removed:
            log.info("risk list @%s repaired from the store by pid %d: version %d -> %d, %d added, %d removed",
                     name, os.getpid(), synced, version, n_added, n_removed)

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

    def _sync_list_names(self) -> None:
        """Creates (with their entries) the stored lists the engine does not have yet."""
        have = {x["name"] for x in json.loads(self.engine.lists_json())}
        stored = self._conn().execute("SELECT name, kind, entries_max FROM risk_lists ORDER BY name").fetchall()
        if all(name in have for name, _, _ in stored):
            return
        versions = self._list_versions()  # before the entries (see `restore`)
        for name, kind, entries_max in stored:
            if name in have:
                continue
            try:
                self.engine.create_list(name, kind, entries_max)
            except RiskListError:
                continue
            for chunk in _chunks(v for (v,) in self._conn().execute(
                    "SELECT value FROM risk_list_entries WHERE list_name = ?", (name,)).fetchall()):
                self.engine.list_add(name, chunk)
            self._lists_synced[name] = versions.get(name, 0)

    def apply_update(self, message: object) -> None:
        """A change published by some process (this one included): apply it to this engine."""
        if not isinstance(message, dict):
            return
        kind = message.get("kind")
        with self._lock:
            if kind == "list":
                name = str(message.get("name", ""))
                values = [v for v in message.get("values") or () if isinstance(v, str)]
                self._sync_list_names()
                if values and message.get("op") in ("add", "remove"):
                    stored = _present(self._conn(), name, values)
                    if message["op"] == "add":  # only what the store still holds (messages may cross)
                        todo = [v for v in values if v in stored]
                        for chunk in _chunks(todo):
                            self.engine.list_add(name, chunk)
                    else:
                        todo = [v for v in values if v not in stored]
                        for chunk in _chunks(todo):
                            self.engine.list_remove(name, chunk)
            elif kind == "model":
                self._load_model_file()
            self.sync_rules()

    def _record(self, scope: str, merchant_id: str | None, source: str | None, author: str, comment: str,
                operation: str, rollback_of: int | None = None) -> RulesetVersion:
        _check_text(author, "author", AUTHOR_CHARS_MAX)
        _check_text(comment, "comment", COMMENT_CHARS_MAX)
        if not author:
            raise ControlError(400, "parameter_missing", "author must not be empty.", "author")
        with self._lock, self._tx() as conn:
            if self._db is not None:
                conn.execute("SELECT pg_advisory_xact_lock(?)", (PG_LOCK_ID,))
            version = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM risk_rulesets").fetchone()[0]
            rv = RulesetVersion(version, scope, merchant_id, source, author, comment, operation, rollback_of,
                                _now_ms())
            conn.execute(
                f"INSERT INTO risk_rulesets ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rv.version, rv.scope, rv.merchant_id or "", rv.source, rv.author, rv.comment, rv.operation,
                 rv.rollback_of, rv.created_ms))
            try:
                self._install(rv)  # compiles again against the lists of this instant, then swaps
            except RulesError as e:
                raise rules_invalid(e) from None
        log.info("risk rules %s: version %d (%s%s) by %s", operation, version, scope,
                 f" {merchant_id}" if merchant_id else "", author)
        self._publish({"kind": "rules", "version": version})
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
        row = self._conn().execute(f"SELECT {_COLUMNS} FROM risk_rulesets WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise ControlError(404, "resource_missing", f"No such ruleset version: {version}", "version")
        old = _row(row)
        return self._record(old.scope, old.merchant_id, old.source, author,
                            comment or f"rollback to version {version}", "rollback", rollback_of=version)

    def history(self, scope: str | None = None, merchant_id: str | None = None, limit: int = 100,
                before: int | None = None) -> list[dict[str, Any]]:
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if scope:
            where.append("scope = ?")
            args.append(scope)
        if merchant_id:
            where.append("merchant_id = ?")
            args.append(merchant_id)
        if before:
            where.append("version < ?")
            args.append(before)
        active = {rv.version for rv in self.active()}
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM risk_rulesets WHERE {' AND '.join(where)} ORDER BY version DESC LIMIT ?",
            (*args, limit)).fetchall()
        return [{**msgspec.structs.asdict(_row(r)), "active": r[0] in active} for r in rows]

    def active(self) -> list[RulesetVersion]:
        """The newest version of every slot that is not cleared, global first."""
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM risk_rulesets r WHERE version = (SELECT max(version) FROM risk_rulesets "
            "WHERE scope = r.scope AND merchant_id = r.merchant_id) ORDER BY scope, merchant_id").fetchall()
        return [rv for rv in map(_row, rows) if rv.source is not None]

    def shadow_stats(self) -> dict[str, Any]:
        return dict(json.loads(self.engine.shadow_stats_json()))

    # -- lists -------------------------------------------------------------------------------------

    def _list_kind(self, name: str) -> str:
        row = self._conn().execute("SELECT kind FROM risk_lists WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ControlError(404, "resource_missing", f"No such list: @{name}", "name")
        return str(row[0])

    def _values(self, kind: str, values: list[str]) -> list[str]:
        out = []
        for v in values:
            if not isinstance(v, str) or not v or len(v.encode()) > VALUE_BYTES_MAX:
                raise ControlError(400, "parameter_invalid",
                                   f"List values are strings of 1 to {VALUE_BYTES_MAX} bytes.", "values")
            out.append(normalize(kind, v))
        return list(dict.fromkeys(out))

    def create_list(self, name: str, kind: str, entries_max: int | None, actor: str) -> dict[str, Any]:
        with self._lock, self._tx() as conn:
            if self._db is not None:
                conn.execute("SELECT pg_advisory_xact_lock(?)", (PG_LOCK_ID,))
            if conn.execute("SELECT 1 FROM risk_lists WHERE name = ?", (name,)).fetchone() is not None:
                raise ControlError(409, "list_exists", f"List @{name} already exists.", "name")
            try:
                self.engine.create_list(name, kind, entries_max)
            except RiskListError as e:
                raise ControlError(400, "list_invalid", str(e), "name") from None
            conn.execute("INSERT INTO risk_lists (name, kind, entries_max, author, created_ms) VALUES (?, ?, ?, ?, ?)",
                         (name, kind, entries_max, actor, _now_ms()))
            self._audit(conn, actor, "list.create", f"@{name}", {"kind": kind, "entries_max": entries_max})
        self._publish({"kind": "list", "op": "create", "name": name})
        return self.get_list(name, 0)

    def _change(self, name: str, values: list[str], actor: str, op: str) -> int:
        """Adds or removes values in SQLite and in the engine, all or nothing."""
        kind = self._list_kind(name)
        vals = self._values(kind, values)
        now = _now_ms()
        with self._lock, self._tx() as conn:
            if self._db is not None:
                conn.execute("SELECT pg_advisory_xact_lock(?)", (PG_LOCK_ID,))
            before = _present(conn, name, vals) if op == "add" else set()
            if op == "add":
                conn.executemany("INSERT OR IGNORE INTO risk_list_entries (list_name, value, added_ms) VALUES (?, ?, ?)",
                                 [(name, v, now) for v in vals])
            else:
                conn.executemany("DELETE FROM risk_list_entries WHERE list_name = ? AND value = ?",
                                 [(name, v) for v in vals])
            done = 0
            try:
                for chunk in _chunks(iter(vals)):
                    done += self.engine.list_add(name, chunk) if op == "add" else self.engine.list_remove(name, chunk)
            except RiskListError as e:
                # The engine took part of the batch before refusing (a full list): take back what is new,
                # so that the engine and the rolled-back store agree.
                if op == "add":
                    self.engine.list_remove(name, [v for v in vals if v not in before])
                code = "list_full" if "full" in str(e) else "list_invalid"
                raise ControlError(422, code, str(e), "values") from None
            self._audit(conn, actor, f"list.{op}", f"@{name}",
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
        current = {v for (v,) in self._conn().execute(
            "SELECT value FROM risk_list_entries WHERE list_name = ?", (name,))}
        stale = sorted(current - wanted)
        removed = self.list_remove(name, stale, actor) if stale else 0
        fresh = sorted(wanted - current)
        added = self.list_add(name, fresh, actor) if fresh else 0
        return added, removed

    def get_list(self, name: str, limit: int = 100, after: str = "") -> dict[str, Any]:
        conn = self._conn()
        row = conn.execute("SELECT kind, entries_max, author, created_ms FROM risk_lists WHERE name = ?",
                           (name,)).fetchone()
        if row is None:
            raise ControlError(404, "resource_missing", f"No such list: @{name}", "name")
        count = conn.execute("SELECT count(*) FROM risk_list_entries WHERE list_name = ?", (name,)).fetchone()[0]
        values = [v for (v,) in conn.execute(
            "SELECT value FROM risk_list_entries WHERE list_name = ? AND value > ? ORDER BY value LIMIT ?",
            (name, after, limit))]
        live = next((x for x in json.loads(self.engine.lists_json()) if x["name"] == name), None)
        return {"name": name, "kind": row[0], "entries_max": row[1], "author": row[2], "created_ms": row[3],
                "entries": count, "values": values, "has_more": len(values) == limit and count > len(values),
                "engine": live}

    def lists(self) -> list[dict[str, Any]]:
        stored = {name: count for name, count in self._conn().execute(
            "SELECT l.name, count(e.value) FROM risk_lists l LEFT JOIN risk_list_entries e ON e.list_name = l.name "
            "GROUP BY l.name")}
        return [{**x, "stored_entries": stored.get(x["name"])} for x in json.loads(self.engine.lists_json())]

    def audit(self, target: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = "SELECT id, at_ms, actor, action, target, detail FROM risk_audit"
        args: tuple[Any, ...] = ()
        if target:
            q += " WHERE target = ?"
            args = (target,)
        rows = self._conn().execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [{"id": r[0], "at_ms": r[1], "actor": r[2], "action": r[3], "target": r[4],
                 "detail": json.loads(r[5])} for r in rows]


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the store's write lock (the tailer writes the same file)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()


_INSERT_OR_IGNORE = re.compile(r"^\s*INSERT OR IGNORE INTO\b", re.IGNORECASE)


def _pg_sql(query: str) -> str:
    """The SQLite statements of this module in PostgreSQL's dialect: `%s` placeholders and
    `INSERT OR IGNORE` as `ON CONFLICT DO NOTHING`."""
    if _INSERT_OR_IGNORE.match(query):
        query = _INSERT_OR_IGNORE.sub("INSERT INTO", query) + " ON CONFLICT DO NOTHING"
    return query.replace("%", "%%").replace("?", "%s")


class _Rows:
    """What a sqlite3 cursor gives this module: fetchone, fetchall, iteration."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)


class _PgConn:
    """A psycopg connection that speaks like the sqlite3 one this module uses."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, query: str, args: Iterable[Any] = ()) -> _Rows:
        cur = self.conn.execute(_pg_sql(query), tuple(args))
        return _Rows(cur.fetchall() if cur.description is not None else [])

    def executemany(self, query: str, rows: Iterable[Iterable[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(_pg_sql(query), rows)


class _PgDb:
    """Cluster mode's store of the control plane: reads on any pooled (autocommit) connection, changes in
    one transaction (`tx`)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def execute(self, query: str, args: Iterable[Any] = ()) -> _Rows:
        with self.pool.connection() as conn:
            return _PgConn(conn).execute(query, args)

    @contextlib.contextmanager
    def tx(self) -> Iterator[_PgConn]:
        with self.pool.connection() as conn, conn.transaction():
            yield _PgConn(conn)


def _present(conn: Any, name: str, values: list[str]) -> set[str]:
    """Which of `values` the stored list holds (looked up per value batch, never the whole list)."""
    out: set[str] = set()
    for i in range(0, len(values), 500):
        part = values[i:i + 500]
        marks = ",".join("?" * len(part))
        out.update(v for (v,) in conn.execute(
            f"SELECT value FROM risk_list_entries WHERE list_name = ? AND value IN ({marks})", (name, *part)))
    return out


def _chunks(values: Iterator[str] | Iterable[str], size: int = CHUNK_VALUES) -> Iterator[list[str]]:
    chunk: list[str] = []
    for v in values:
        chunk.append(v)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- backtest --------------------------------------------------------------------------------------

ACTIONS = ("allow", "block", "challenge", "review")


def risk_request(record: dict[str, Any], ip_country: Callable[[str], str | None]) -> dict[str, Any] | None:
    """The RiskRequest the fast path built for a `payment.created` WAL record (None for other records).

    Like the fast path: the card is the payment method, the customer fields come from `customer`,
    `ip_country` is looked up from the IP, and `amount_usd` is left to the engine's rate table.
    """
    if record.get("type") != "payment.created":
        return None
    p = record.get("payment") or {}
    c = p.get("customer") or {}
    req: dict[str, Any] = {"merchant_id": record["merchant_id"], "amount": p["amount"], "currency": p["currency"],
                           "card": p.get("payment_method")}
    for key, field in (("email", "email"), ("ip", "ip"), ("device_id", "device_id"), ("customer_id", "id"),
                       ("customer_country", "country")):
        if c.get(field):
            req[key] = c[field]
    if c.get("ip"):
        country = ip_country(c["ip"])
        if country:
            req["ip_country"] = country
    return req


def backtest_engine(conn: sqlite3.Connection | _PgDb, source: str, merchant_id: str | None, model_bytes: bytes | None,
                    keys_per_dimension_max: int) -> RiskEngine:
    """A standalone engine with the stored lists, the model, the active rulesets and the candidate in
    place of the global ruleset (or of `merchant_id`'s ruleset). RulesInvalid if the candidate is bad.
    `conn` is the SQLite store's connection (embedded mode) or the control plane's PostgreSQL (cluster
    mode, `RiskControl.db`)."""
    engine = RiskEngine(keys_per_dimension_max=keys_per_dimension_max, shadow_samples_max=0)
    for name, kind, entries_max in conn.execute("SELECT name, kind, entries_max FROM risk_lists ORDER BY name").fetchall():
        engine.create_list(name, kind, entries_max)
        for chunk in _chunks(v for (v,) in conn.execute(
                "SELECT value FROM risk_list_entries WHERE list_name = ?", (name,)).fetchall()):
            engine.list_add(name, chunk)
    if model_bytes is not None:
        engine.load_model(model_bytes)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM risk_rulesets r WHERE version = (SELECT max(version) FROM risk_rulesets "
        "WHERE scope = r.scope AND merchant_id = r.merchant_id) AND source IS NOT NULL AND scope != 'shadow'"
    ).fetchall()
    for rv in map(_row, rows):
        if rv.scope == "global" and not merchant_id:
            continue
        if rv.scope == "merchant" and rv.merchant_id == merchant_id:
            continue
        if rv.scope == "global":
            engine.set_rules(rv.source or "", rv.version)
        else:
            engine.set_merchant_rules(rv.merchant_id or "", rv.source, rv.version)
    try:
        if merchant_id:
            engine.set_merchant_rules(merchant_id, source, 0)
        else:
            engine.set_rules(source, 0)
    except RulesError as e:
        raise rules_invalid(e) from None
    return engine


def backtest(engine: RiskEngine, records: Iterable[EventRecord], ip_country: Callable[[str], str | None],
             records_max: int, stats: ReadStats | None = None, source: str = "wal") -> dict[str, Any]:
    """Replays `payment.created` records in the event log's order, each at its own `created_ms`, so
    velocity evolves as it did live, and counts what the candidate would have decided beside what was
    decided. At most `records_max` payments are replayed (`truncated` says there were more); `stats`
    is the read's own account (records scanned, duplicates dropped)."""
    started = time.perf_counter()
    candidate = dict.fromkeys(ACTIONS, 0)
    live: dict[str, int] = dict.fromkeys(ACTIONS, 0)
    transitions: dict[tuple[str, str], int] = {}
    rules: dict[tuple[str, str], dict[str, Any]] = {}
    changed = n = 0
    # Payments replayed per source (per WAL: one per gateway process); bounded by the processes.
    sources: dict[str, int] = {}
    first: EventRecord | None = None
    last: EventRecord | None = None
    truncated = False
    verbs = {"allow": "allowed", "block": "blocked", "challenge": "challenged", "review": "reviewed"}
    for rec in records:
        if rec.type != "payment.created":
            continue
        if n >= records_max:
            truncated = True
            break
        try:
            record = json.loads(rec.payload)
        except ValueError:
            continue
        req = risk_request(record, ip_country)
        if req is None:
            continue
        n += 1
        sources[rec.source] = sources.get(rec.source, 0) + 1
        first = rec if first is None else first
        last = rec
        d = json.loads(engine.decide_json(json.dumps(req), int(record["created_ms"])))
        action = d["action"]
        candidate[action] += 1
        live_action = ((record["payment"].get("risk") or {}).get("action")) or "unknown"
        live[live_action] = live.get(live_action, 0) + 1
        transitions[(live_action, action)] = transitions.get((live_action, action), 0) + 1
        changed += live_action != action
        for m in d["matched_rules"]:
            key = (m["scope"], m["name"])
            stat = rules.setdefault(key, {"name": m["name"], "scope": m["scope"], "action": m["action"],
                                          "matched": 0, "allowed": 0, "blocked": 0, "challenged": 0,
                                          "reviewed": 0})
            stat["matched"] += 1
        if d["rule"] is not None:
            # The deciding rule is the first matched rule with its name and the final action (global first).
            m = next(m for m in d["matched_rules"] if m["name"] == d["rule"] and m["action"] == action)
            rules[(m["scope"], m["name"])][verbs[action]] += 1
    elapsed_s = time.perf_counter() - started
    return {
        "object": "risk_backtest",
        "source": source,
        "records": n,
        "records_scanned": stats.scanned if stats is not None else n,
        "duplicates": stats.duplicates if stats is not None else 0,
        "records_per_s": round(n / elapsed_s) if elapsed_s > 0 else None,
        "sources": sources,
        # LSNs name positions in one WAL: with records of several processes they are per source.
        "first_lsn": first.lsn if first is not None else None,
        "last_lsn": last.lsn if last is not None else None,
        "first_created_ms": first.created_ms if first is not None else None,
        "last_created_ms": last.created_ms if last is not None else None,
        "truncated": truncated or (stats is not None and stats.truncated),
        "candidate": candidate,
        "live": live,
        "changed": changed,
        "transitions": sorted([a, b, c] for (a, b), c in transitions.items()),
        "rules": list(rules.values()),
        "elapsed_ms": round(elapsed_s * 1000, 1),
    }


def backtest_log(engine: RiskEngine, log: EventLog, ip_country: Callable[[str], str | None], records_max: int, *,
                 since_ms: int = 0, until_ms: int = TIME_MS_MAX, after_lsn: int = 0,
                 source: str = "wal") -> dict[str, Any]:
    """`backtest` over the records of an event log in `[since_ms, until_ms)` (and after `after_lsn` in
    its own WAL). The read stops one record past `records_max`, so `truncated` is exact."""
    stats = ReadStats()
    records = log.read(since_ms=since_ms, until_ms=until_ms, after_lsn=after_lsn,
                       limit=min(records_max + 1, READ_RECORDS_MAX), stats=stats)
    out = backtest(engine, records, ip_country, records_max, stats, source)
    out["since_ms"] = since_ms
    out["until_ms"] = until_ms if until_ms != TIME_MS_MAX else None
    return out
