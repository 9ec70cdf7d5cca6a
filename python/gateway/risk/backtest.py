"""Backtests: replay the durable `payment.created` records of an event log against a candidate ruleset.

The records come from an `EventLog` (gateway.feed.eventlog): the local WAL in embedded mode, the Kafka
topic (every process's records) in cluster mode. Each payment is decided at its own `created_ms` by a
standalone engine (`backtest_engine`) holding the stored lists, the model and the live rulesets with the
candidate in place, so velocity evolves as it did live; the live engine is never touched.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway._fastpath import RiskEngine, RulesError
from gateway.domain.records import Customer, RiskRecord, decode_risk_record
from gateway.feed.eventlog import READ_RECORDS_MAX, TIME_MS_MAX, EventLog, EventRecord, ReadStats
from gateway.risk.base import chunks, rules_invalid, ruleset_from_row
from gateway.store.risk import RiskStore

ACTIONS = ("allow", "block", "challenge", "review")


def payload_risk_request(payload: bytes, ip_country: Callable[[str], str | None]) -> dict[str, Any] | None:
    """The RiskRequest of a WAL record's bytes; None for a record that is not a `payment.created`."""
    record = decode_risk_record(payload)
    return risk_request(record, ip_country) if record is not None else None


def risk_request(record: RiskRecord, ip_country: Callable[[str], str | None]) -> dict[str, Any]:
    """The RiskRequest the fast path built for a `payment.created` WAL record.

    Like the fast path: the card is the payment method, the customer fields come from `customer`,
    `ip_country` is looked up from the IP, and `amount_usd` is left to the engine's rate table.
    """
    p = record.payment
    c = p.customer or Customer()
    req: dict[str, Any] = {"merchant_id": record.merchant_id, "amount": p.amount, "currency": p.currency,
                           "card": p.payment_method}
    for key, value in (("email", c.email), ("ip", c.ip), ("device_id", c.device_id), ("customer_id", c.id),
                       ("customer_country", c.country)):
        if value:
            req[key] = value
    if c.ip:
        country = ip_country(c.ip)
        if country:
            req["ip_country"] = country
    return req


def backtest_engine(conn: RiskStore | sqlite3.Connection, source: str, merchant_id: str | None,
                    model_bytes: bytes | None, keys_per_dimension_max: int) -> RiskEngine:
    """A standalone engine with the stored lists, the model, the active rulesets and the candidate in
    place of the global ruleset (or of `merchant_id`'s ruleset). RulesInvalid if the candidate is bad.
    `conn` is the control plane's store (`RiskControl.db` in cluster mode) or a SQLite store's
    connection (embedded mode)."""
    rs = conn if isinstance(conn, RiskStore) else RiskStore.on_connection(conn)
    engine = RiskEngine(keys_per_dimension_max=keys_per_dimension_max, shadow_samples_max=0)
    for name, kind, entries_max in rs.lists():
        engine.create_list(name, kind, entries_max)
        for chunk in chunks(rs.list_values(name)):
            engine.list_add(name, chunk)
    if model_bytes is not None:
        engine.load_model(model_bytes)
    for rv in map(ruleset_from_row, rs.live_rulesets()):
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
        record = decode_risk_record(rec.payload)
        if record is None:
            continue
        req = risk_request(record, ip_country)
        n += 1
        sources[rec.source] = sources.get(rec.source, 0) + 1
        first = rec if first is None else first
        last = rec
        d = json.loads(engine.decide_json(json.dumps(req), record.created_ms))
        action = d["action"]
        candidate[action] += 1
        live_action = (record.payment.risk.action if record.payment.risk else None) or "unknown"
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
