"""The floor: a bare granian RSGI app that reads the request body and returns a fixed 201.

Nothing a real gateway does (routing, auth, decoding, risk, durability) happens here, so its knee is
the ceiling that the HTTP server, the event loop and the load generator impose on this machine. The
gateway's knee divided by this one says how much of that ceiling the gateway keeps.

Run: granian --interface rsgi --working-dir bench floor_app:app
"""

from __future__ import annotations

from typing import Any

BODY = (
    b'{"id":"pay_floor000000000000000000","object":"payment","status":"processing",'
    b'"amount":1000,"currency":"USD","livemode":false}'
)
HEADERS = [("content-type", "application/json")]
HEALTH = b'{"status":"ok"}'


def answered_without_work(scope: Any, proto: Any) -> bool:
    """What both floors (this one and durable_floor_app.py) answer alike: an event that is not an HTTP
    request needs no answer, and a health check gets its 200. False for a request the app must answer."""
    if scope.proto != "http":
        return True
    if scope.path in ("/healthz", "/readyz"):
        proto.response_bytes(200, HEADERS, HEALTH)
        return True
    return False


async def app(scope: Any, proto: Any) -> None:
    if answered_without_work(scope, proto):
        return
    if scope.method == "POST":
        await proto()
    proto.response_bytes(201, HEADERS, BODY)
