"""The webhook dispatcher's resolver: a host name is checked where it is resolved, so the address the
connection uses is the address checked (no DNS rebinding into the gateway's own network), and what a
refused, unreachable or private target reads as `last_error`."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from gateway.processing.webhooks import PublicResolver, failure_name
from support import free_port


class ScriptedDns(AbstractResolver):
    """Answers each lookup with the next address of a script (a name whose answer changes)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.lookups = 0

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        address = self.addresses[min(self.lookups, len(self.addresses) - 1)]
        self.lookups += 1
        return [ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=0)]

    async def close(self) -> None:
        return


async def _listener() -> tuple[asyncio.Server, list[int], int]:
    """A TCP server on loopback counting the connections it accepts."""
    accepted: list[int] = []

    async def on_connect(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        w.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, accepted, server.sockets[0].getsockname()[1]


async def _post(resolver: AbstractResolver | None, url: str) -> BaseException:
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            async with http.post(url, data=b"{}", allow_redirects=False):
                pass
        except (aiohttp.ClientError, OSError) as e:
            return e
    raise AssertionError("the post went through")


def test_a_name_that_rebinds_to_a_private_address_is_never_connected_to() -> None:
    async def run() -> tuple[str, str, list[int], int]:
        server, accepted, port = await _listener()
        dns = ScriptedDns("93.184.216.34", "127.0.0.1")  # public when checked first, then loopback
        public = await PublicResolver(dns).resolve("hooks.example", port)
        refused = await _post(PublicResolver(dns), f"http://hooks.example:{port}/h")
        server.close()
        return public[0]["host"], failure_name(refused), accepted, dns.lookups

    public, error, accepted, lookups = asyncio.run(run())
    assert public == "93.184.216.34"
    assert error == "address_not_allowed" and accepted == [] and lookups == 2


def test_without_the_guard_the_same_name_connects_and_a_closed_port_reads_connect_error() -> None:
    async def run() -> tuple[list[int], str]:
        server, accepted, port = await _listener()
        await _post(ScriptedDns("127.0.0.1"), f"http://hooks.example:{port}/h")  # the server hangs up
        refused = await _post(None, f"http://127.0.0.1:{free_port()}/h")
        server.close()
        return accepted, failure_name(refused)

    accepted, error = asyncio.run(run())
    assert accepted == [1] and error == "ConnectError"


@pytest.mark.parametrize(("error", "name"), [(TimeoutError(), "timeout"), (ValueError("bad url"), "ValueError"),
                                             (aiohttp.ServerDisconnectedError(), "ServerDisconnectedError")])
def test_other_failures_read_as_their_kind(error: BaseException, name: str) -> None:
    assert failure_name(error) == name
