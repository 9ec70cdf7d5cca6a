"""Background create traffic for the cluster tests: the thread, client and `with` block they share.

A subclass says how one lane sends its creates of `body` (`_lane`, with `_create` for each one) and
what it records of the answers (`outcome`, whose `acked` maps each idempotency key answered 2xx to its
payment id); this class runs `lanes` of them on one `httpx.AsyncClient` in a daemon thread from
`__enter__` until `__exit__`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Self

import httpx
from support import auth

CLIENT_TIMEOUT_S = 15
JOIN_TIMEOUT_S = 60


class BackgroundTraffic:
    # The subclass's record of what the clients saw; `wait_acked` reads its `acked`.
    outcome: Any
    # How long `wait_acked` waits for its acknowledgements unless told otherwise.
    ack_timeout_s: float = 60

    def __init__(self, url: str, body: dict[str, Any], lanes: int, connections_per_lane: int = 1) -> None:
        self.url = url
        self.body = body
        self.lanes = lanes
        self.connections_per_lane = connections_per_lane
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _lane(self, client: httpx.AsyncClient) -> None:
        raise NotImplementedError

    async def _create(self, client: httpx.AsyncClient, key: str) -> httpx.Response | None:
        """POSTs one create of `body` with the idempotency key `key`; None where the transport failed."""
        try:
            return await client.post(f"{self.url}/v1/payments", json=self.body,
                                     headers={**auth(), "Idempotency-Key": key})
        except httpx.HTTPError:
            return None

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.lanes * self.connections_per_lane, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*[self._lane(client) for _ in range(self.lanes)])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=JOIN_TIMEOUT_S)

    def progress(self) -> object:
        """What a `wait_acked` that ran out of time shows of the traffic so far."""
        return self.outcome

    def wait_acked(self, n: int, timeout_s: float | None = None) -> None:
        """Block until `n` more keys than at the call have been answered 2xx."""
        timeout_s = self.ack_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        start = len(self.outcome.acked)
        while len(self.outcome.acked) < start + n:
            assert time.monotonic() < deadline, f"fewer than {n} new 2xx in {timeout_s}s: {self.progress()}"
            time.sleep(0.05)
