"""The lean Redis client of the create path (shared/resp.py) against the real Redis of deploy/: pipelined
replies in order, scripts after Redis forgot them, and every failure (timeout, killed connection, too
many calls, nothing listening) a quick `RespError` after which the next call works again."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import hiredis
import pytest
import redis
from gateway.shared.resp import RespClient, RespError, Script, pack

from cluster.conftest import run_services_up

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def redis_url() -> str:
    return run_services_up()["REDIS_URL"]


def test_pipelined_commands_answer_in_order_and_an_error_reply_is_returned(redis_url: str) -> None:
    key = f"resp:{uuid.uuid4().hex}"

    async def main() -> list[object]:
        client = RespClient(redis_url, 1.0, inflight_max=8)
        try:
            replies = await client.call(pack("SET", key, b"v\r\n1", "EX", 60), pack("GET", key),
                                        pack("INCR", key), pack("DEL", key), pack("GET", key))
            # Many callers at once share the connections; each gets its own replies.
            many = await asyncio.gather(*(client.call(pack("ECHO", f"m{i}")) for i in range(500)))
            assert [r[0] for r in many] == [f"m{i}".encode() for i in range(500)]
            return replies
        finally:
            await client.close()

    ok, got, incr, deleted, gone = asyncio.run(main())
    assert (ok, got, deleted, gone) == (b"OK", b"v\r\n1", 1, None)
    assert isinstance(incr, hiredis.ReplyError) and "not an integer" in str(incr)


def test_a_script_redis_forgot_is_loaded_again(redis_url: str) -> None:
    script = Script(f"return {{'{uuid.uuid4().hex}', ARGV[1], KEYS[1]}}")

    async def main() -> tuple[object, object]:
        client = RespClient(redis_url, 1.0, inflight_max=8)
        try:
            first = await client.evalsha(script, ["k1"], [7])
            redis.Redis.from_url(redis_url).script_flush()  # as after a restart
            return first, await client.evalsha(script, ["k2"], [1.5])
        finally:
            await client.close()

    first, second = asyncio.run(main())
    assert first[1:] == [b"7", b"k1"] and second[1:] == [b"1.5", b"k2"]


def test_a_call_past_its_timeout_fails_with_those_in_flight_and_the_next_call_reconnects(redis_url: str) -> None:
    key = f"resp:blocked:{uuid.uuid4().hex}"

    async def main() -> tuple[list[BaseException | list[object]], float, list[object]]:
        client = RespClient(redis_url, 0.3, inflight_max=8)
        try:
            await client.call(pack("PING"))
            t0 = time.monotonic()
            # BLPOP holds its connection for 5 s; the ECHOs behind it on the same connection cannot be
            # answered before it, so they fail with it.
            slow = [client.call(pack("BLPOP", key, 5)), client.call(pack("ECHO", "a")),
                    client.call(pack("ECHO", "b"))]
            out = await asyncio.gather(*slow, return_exceptions=True)
            return out, time.monotonic() - t0, await client.call(pack("ECHO", "after"))
        finally:
            await client.close()

    out, took, after = asyncio.run(main())
    assert isinstance(out[0], RespError) and "no answer within 300 ms" in str(out[0])
    assert any(isinstance(o, RespError) for o in out[1:])
    assert took < 2.0 and after == [b"after"]


def test_a_killed_connection_fails_its_calls_and_the_next_call_reconnects(redis_url: str) -> None:
    async def main() -> tuple[BaseException | None, list[object]]:
        client = RespClient(redis_url, 2.0, inflight_max=8)
        try:
            ids = [(await client.call(pack("CLIENT", "ID")))[0] for _ in range(2)]  # both connections
            blocked = asyncio.ensure_future(client.call(pack("BLPOP", f"resp:{uuid.uuid4().hex}", 10)))
            await asyncio.sleep(0.2)
            killer = redis.Redis.from_url(redis_url)
            for client_id in ids:  # only this client's connections: other tests' clients live on
                assert killer.execute_command("CLIENT", "KILL", "ID", client_id) == 1
            try:
                await blocked
                failed: BaseException | None = None
            except RespError as e:
                failed = e
            await asyncio.sleep(0.05)
            return failed, [await client.call(pack("ECHO", str(i))) for i in range(4)]
        finally:
            await client.close()

    failed, after = asyncio.run(main())
    assert isinstance(failed, RespError) and "connection lost" in str(failed)
    assert after == [[b"0"], [b"1"], [b"2"], [b"3"]]


def test_calls_past_the_in_flight_bound_wait_then_fail_and_nothing_listening_fails_fast(redis_url: str) -> None:
    async def crowded() -> tuple[BaseException | None, float]:
        client = RespClient(redis_url, 0.3, inflight_max=2)
        try:
            for _ in range(2):  # the bound's room, held as by calls that never end
                await client._room.acquire()
            t0 = time.monotonic()
            try:
                await client.call(pack("PING"))
                return None, 0.0
            except RespError as e:
                return e, time.monotonic() - t0
        finally:
            await client.close()

    err, waited = asyncio.run(crowded())
    assert isinstance(err, RespError) and "too many Redis calls in flight" in str(err)
    assert 0.25 < waited < 1.0

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def nobody() -> tuple[BaseException, float]:
        client = RespClient(f"redis://:s3cret@127.0.0.1:{port}/0", 1.0, inflight_max=8)
        assert "s3cret" not in repr(client)
        t0 = time.monotonic()
        try:
            await client.call(pack("PING"))
        except RespError as e:
            return e, time.monotonic() - t0
        raise AssertionError("a call with nothing listening succeeded")

    e, took = asyncio.run(nobody())
    assert "cannot connect" in str(e) and took < 1.0 and "s3cret" not in str(e)


def test_an_unsupported_url_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="rediss"):
        RespClient("rediss://127.0.0.1:6380/0", 1.0, inflight_max=8)
