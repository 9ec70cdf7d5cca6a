"""Cluster-mode create decisions (runtime/cluster.py) with the in-memory SharedState fake and a stub fast
path: what reaches the fast path, and what is answered without it."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from gateway._fastpath import FastPath
from gateway.api.http import PAYMENT_ID
from gateway.api.payments import respond
from gateway.config import parse
from gateway.domain.idempotency import create_fingerprint
from gateway.runtime.base import CreateAnswer
from gateway.runtime.cluster import ClusterRuntime
from gateway.shared.redis_state import InMemorySharedState
from gateway.store.base import Merchant

MERCHANT = Merchant("acct_a", "Shop")
BODY = b'{"amount": 100, "currency": "USD", "payment_method": "tok_visa"}'


class StubCluster(ClusterRuntime):
    """The cluster runtime with the in-memory shared state and a stub in place of the fast-path call:
    `accept` records the call and answers like the fast path. Its fast path only fingerprints."""

    def __init__(self, rate_per_s: float, tmp_dir: Path) -> None:
        super().__init__(parse(f"[server]\nmode = 'cluster'\n[rate_limit]\nper_s = {rate_per_s}\n"
                               f"burst = {rate_per_s}\n"), tmp_dir)
        self.accepted: list[tuple[str | None, bytes]] = []
        self.ready = True
        self.velocity_shared = False
        self.fastpath = FastPath(self.config.fastpath_json(tmp_dir))

    async def accept(self, merchant: Merchant, idem_key: str | None, body: bytes,
                     velocity: list[int] | None) -> CreateAnswer:
        self.accepted.append((idem_key, body))
        pid = f"pay_{len(self.accepted):024d}"
        return CreateAnswer(201, json.dumps({"id": pid}).encode(), len(self.accepted), pid,
                            echo_key=idem_key is not None)

    async def create_payment(self, merchant: Merchant, idem_key: str | None, body: bytes) -> Any:
        return respond(await self.create(merchant, idem_key, body), idem_key)

    async def get_payment(self, _scope: Any, payment_id: str) -> Any:
        body = await self.read_payment(MERCHANT.id, payment_id) if PAYMENT_ID.match(payment_id) else None
        return (200, [], body) if body is not None else (404, [], b"")


_TMP = Path(tempfile.mkdtemp(prefix="cluster-api-"))


def fingerprint(body: bytes) -> str:
    return create_fingerprint(FastPath(parse("").fastpath_json(Path(tempfile.mkdtemp(dir=_TMP)))), body)


def make(rate_per_s: float = 1000.0) -> tuple[StubCluster, StubCluster, InMemorySharedState]:
    cluster = StubCluster(rate_per_s, Path(tempfile.mkdtemp(dir=_TMP)))
    shared = InMemorySharedState()
    cluster.shared = shared
    return cluster, cluster, shared


def test_shared_state_down_answers_503_without_touching_the_fast_path() -> None:
    cluster, app, shared = make()
    shared.down = True
    status, headers, body = asyncio.run(cluster.create_payment(MERCHANT, "k1", BODY))
    assert status == 503 and ("retry-after", "1") in headers
    assert json.loads(body)["error"]["code"] == "shared_state_unavailable"
    assert app.accepted == []


def test_replay_with_reordered_json_is_served_from_shared_state() -> None:
    cluster, app, _ = make()

    async def go() -> tuple[Any, Any]:
        first = await cluster.create_payment(MERCHANT, "k1", BODY)
        again = await cluster.create_payment(
            MERCHANT, "k1", b'{"payment_method":"tok_visa","currency":"USD","amount":100}')
        return first, again

    first, again = asyncio.run(go())
    assert first[0] == 201 and again[0] == 201 and again[2] == first[2]
    assert ("idempotent-replayed", "true") in again[1]
    assert len(app.accepted) == 1


def test_same_key_other_parameters_is_an_idempotency_error() -> None:
    cluster, app, _ = make()

    async def go() -> Any:
        await cluster.create_payment(MERCHANT, "k1", BODY)
        return await cluster.create_payment(MERCHANT, "k1", BODY.replace(b"100", b"101"))

    status, _, body = asyncio.run(go())
    assert status == 400 and json.loads(body)["error"]["type"] == "idempotency_error"
    assert len(app.accepted) == 1


def test_key_held_by_another_process_answers_409() -> None:
    cluster, app, shared = make()

    async def go() -> Any:
        await shared.admit(MERCHANT.id, "k1", fingerprint(BODY), 10.0, 10.0, 5_000)  # the other process
        return await cluster.create_payment(MERCHANT, "k1", BODY)

    status, _, body = asyncio.run(go())
    assert status == 409 and json.loads(body)["error"]["type"] == "idempotency_error"
    assert app.accepted == []


def test_shared_rate_limit_answers_429_with_retry_after() -> None:
    cluster, app, _ = make(rate_per_s=2.0)

    async def go() -> list[Any]:
        return [await cluster.create_payment(MERCHANT, None, BODY) for _ in range(3)]

    out = asyncio.run(go())
    assert [r[0] for r in out] == [201, 201, 429]
    assert any(h[0] == "retry-after" for h in out[2][1])
    assert len(app.accepted) == 2


def test_fingerprint_ignores_key_order_and_whitespace() -> None:
    assert fingerprint(b'{"amount": 1, "currency": "USD", "payment_method": "tok_visa"}') == fingerprint(
        b'{"payment_method":"tok_visa","currency":"USD","amount":1}')
    assert fingerprint(b'{"amount": 1, "currency": "USD", "payment_method": "tok_visa"}') != fingerprint(
        b'{"amount": 2, "currency": "USD", "payment_method": "tok_visa"}')


class StubStore:
    def __init__(self, rows: dict[tuple[str, str], bytes]) -> None:
        self.rows = rows
        self.down = False

    def get_payment(self, merchant_id: str, payment_id: str) -> bytes | None:
        if self.down:
            raise psycopg.OperationalError("connection refused")
        return self.rows.get((merchant_id, payment_id))


def test_reads_fall_back_to_the_store_when_shared_state_is_down() -> None:
    cluster, _, shared = make()
    pid = "pay_" + "a" * 24
    cluster.store = StubStore({(MERCHANT.id, pid): b'{"id":"from-store"}'})  # type: ignore[assignment]

    async def go() -> list[Any]:
        await shared.finish(MERCHANT.id, None, "", 201, b'{"id":"from-shared"}', pid, cache=False)
        up = await cluster.get_payment(None, pid)
        shared.down = True
        down = await cluster.get_payment(None, pid)
        other = await cluster.get_payment(None, "pay_" + "b" * 24)
        return [up, down, other]

    up, down, other = asyncio.run(go())
    # The store's row is the truth even while a read-your-writes copy is left in Redis.
    assert (up[0], up[2]) == (200, b'{"id":"from-store"}')
    assert (down[0], down[2]) == (200, b'{"id":"from-store"}')
    assert other[0] == 404


def test_the_read_your_writes_copy_answers_only_for_payments_the_store_does_not_hold_yet() -> None:
    cluster, _, shared = make()
    stored, accepted = "pay_" + "a" * 24, "pay_" + "c" * 24
    store = StubStore({(MERCHANT.id, stored): b'{"id":"captured-in-store"}'})
    cluster.store = store  # type: ignore[assignment]

    async def go() -> list[Any]:
        for pid in (stored, accepted):
            await shared.finish(MERCHANT.id, None, "", 201, b'{"id":"processing-copy"}', pid, cache=False)
        answers = [await cluster.get_payment(None, stored), await cluster.get_payment(None, accepted)]
        store.down = True  # PostgreSQL unreachable: the copy is all there is
        answers.append(await cluster.get_payment(None, accepted))
        return answers

    stale, fresh, store_down = asyncio.run(go())
    assert (stale[0], stale[2]) == (200, b'{"id":"captured-in-store"}')
    assert (fresh[0], fresh[2]) == (200, b'{"id":"processing-copy"}')
    assert (store_down[0], store_down[2]) == (200, b'{"id":"processing-copy"}')


class ForgetfulSharedState(InMemorySharedState):
    """Redis just restarted empty (no keys-since mark), then fails again before the mark is set."""

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        adm = await super().admit(*args, **kwargs)
        self.down = True
        return msgspec.structs.replace(adm, keys_since_ms=None)

    async def mark_keys_since(self, merchant_id: str, since_ms: int) -> int:
        self._check()
        return since_ms


class KeyStore(StubStore):
    def has_idempotency_keys_since(self, merchant_id: str, since_ms: int) -> bool:
        return True


def test_shared_state_failing_after_admission_answers_503_and_creates_nothing() -> None:
    cluster, app, _ = make()
    cluster.shared = ForgetfulSharedState()
    cluster.store = KeyStore({})  # type: ignore[assignment]
    status, headers, body = asyncio.run(cluster.create_payment(MERCHANT, "k1", BODY))
    assert status == 503 and ("retry-after", "1") in headers
    assert json.loads(body)["error"]["code"] == "shared_state_unavailable"
    assert app.accepted == []
