"""Keeping one process's engine lists in step with the stored lists (cluster mode: many processes).

A list's version is the id of its newest audit row (`risk_audit.target = '@name'`). Every list
change writes that row in the transaction of the change, under the control plane's lock (the
advisory lock in cluster mode), so the ids of one list's changes grow in commit order: a durable
change counter that needs no table of its own. The audit rows also say what changed (the values,
verbatim up to AUDIT_VALUES_MAX per row), so a missed change is repaired by replaying the rows
after the version the engine holds, against what the store holds now.

Invariants: values are added before stale ones are removed, so a value that stays listed is listed at
every instant (a blocklist never opens while it is repaired); a list's synced version is noted before
its entries are read, so entries read later can only be newer than the version noted. The caller
holds the control plane's lock around every method.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from gateway._fastpath import RiskEngine, RiskListError
from gateway.risk.base import LIST_REPAIR_ROWS_MAX, LIST_REPAIR_VALUES_MAX, chunks
from gateway.store.risk import RiskStore

log = logging.getLogger("gateway.risk")


class ListSync:
    """The list versions one engine is reconciled up to, and the repairs that move them forward."""

    def __init__(self, engine: RiskEngine, rs: RiskStore) -> None:
        self.engine = engine
        self.rs = rs
        # The list version (`RiskStore.list_versions`) each engine list is reconciled up to.
        self.synced: dict[str, int] = {}
        # Lists found holding more entries than the store after a repair (see `sync`).
        self.drift: dict[str, int] = {}

    def _live(self, name: str) -> dict[str, Any] | None:
        return next((x for x in json.loads(self.engine.lists_json()) if x["name"] == name), None)

    def restore(self) -> tuple[int, int]:
        """Loads every stored list into the engine; returns (lists, entries)."""
        lists = entries = 0
        # Versions before entries: entries read later can only be newer than the version noted.
        versions = self.rs.list_versions()
        for name, kind, entries_max in self.rs.lists():
            try:
                self.engine.create_list(name, kind, entries_max)
            except RiskListError:
                pass  # already in the engine: a hook that runs twice must not fail
            lists += 1
            for chunk in chunks(self.rs.list_values(name)):
                entries += self.engine.list_add(name, chunk)
            self.synced[name] = versions.get(name, 0)
        return lists, entries

    def sync_names(self) -> None:
        """Creates (with their entries) the stored lists the engine does not have yet."""
        have = {x["name"] for x in json.loads(self.engine.lists_json())}
        stored = self.rs.lists()
        if all(name in have for name, _, _ in stored):
            return
        versions = self.rs.list_versions()  # before the entries (see `restore`)
        for name, kind, entries_max in stored:
            if name in have:
                continue
            try:
                self.engine.create_list(name, kind, entries_max)
            except RiskListError:
                continue
            for chunk in chunks(self.rs.list_values(name)):
                self.engine.list_add(name, chunk)
            self.synced[name] = versions.get(name, 0)

    def sync(self) -> list[str]:
        """Repairs every list whose stored version differs from the one this engine holds; returns their names."""
        self.sync_names()
        repaired = []
        for name, version in self.rs.list_versions().items():
            if self.synced.get(name, 0) != version:
                self.repair(name, self.synced.get(name, 0), version)
                repaired.append(name)
        return repaired

    def _changes(self, name: str, synced: int, version: int) -> tuple[set[str], set[str], bool]:
        """The values added and removed by the list's audit rows in (synced, version], and whether the
        whole list must be read again instead (an add larger than its row, or too many values)."""
        added: set[str] = set()
        removed: set[str] = set()
        reload_all = False
        after = synced
        while True:
            rows = self.rs.list_changes(name, after, version, LIST_REPAIR_ROWS_MAX)
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
                # not read are found by the count check in `repair`.
                reload_all = True
                break
        return added, removed, reload_all

    def repair(self, name: str, synced: int, version: int) -> None:
        added, removed, reload_all = self._changes(name, synced, version)
        candidates = sorted(added | removed)
        stored = self.rs.present(name, candidates) if candidates else set()
        fresh = self.rs.list_values(name) if reload_all else [v for v in candidates if v in stored]
        n_added = sum(self.engine.list_add(name, chunk) for chunk in chunks(fresh))
        stale = [v for v in candidates if v not in stored]
        n_removed = sum(self.engine.list_remove(name, chunk) for chunk in chunks(stale))
        self.synced[name] = version
        want = self.rs.list_count(name)
        have = (self._live(name) or {}).get("entries")
        if self.rs.list_versions().get(name, 0) != version:
            pass  # changed again meanwhile: the counts may disagree for that reason; the next poll checks
        elif have is not None and have > want:
            # A removal of more values than its audit row names, missed: the values are unknown here.
            self.drift[name] = have - want
            log.error("risk list @%s holds %d entries in pid %d and %d in the store after a repair; a restart "
                      "reloads it", name, have, os.getpid(), want)
        else:
            self.drift.pop(name, None)
        if n_added or n_removed:
            log.info("risk list @%s repaired from the store by pid %d: version %d -> %d, %d added, %d removed",
                     name, os.getpid(), synced, version, n_added, n_removed)

    def apply(self, op: str, name: str, values: list[str]) -> None:
        """A published list change: applied as far as the store still agrees with it (messages may cross)."""
        self.sync_names()
        if not values or op not in ("add", "remove"):
            return
        stored = self.rs.present(name, values)
        if op == "add":
            for chunk in chunks([v for v in values if v in stored]):
                self.engine.list_add(name, chunk)
        else:
            for chunk in chunks([v for v in values if v not in stored]):
                self.engine.list_remove(name, chunk)
