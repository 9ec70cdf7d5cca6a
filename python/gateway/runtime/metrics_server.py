"""A `/metrics` endpoint of its own, for processes without the gateway's HTTP API (cluster `gateway
worker`): a small threaded HTTP server on loopback by default, answering GET /metrics with the
Prometheus text of `render()`, /healthz (the process answers), and /readyz (`ready()` says whether it
does its job: 200, or 503 with the reason). Rendering runs on the server's thread; the counters it
reads are plain dicts that the worker's event loop updates (copied before they are iterated)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("gateway.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4"


class MetricsServer:
    def __init__(self, host: str, port: int, render: Callable[[], str],
                 ready: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.render = render
        self.ready = ready
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    try:
                        body, status = outer.render().encode(), 200
                    except Exception:
                        log.exception("rendering the metrics failed")
                        body, status = b"metrics unavailable\n", 500
                    content_type = CONTENT_TYPE
                elif self.path == "/healthz":
                    body, status, content_type = b'{"status":"ok"}', 200, "application/json"
                elif self.path == "/readyz":
                    ok, why = outer.ready() if outer.ready is not None else (True, "")
                    body = json.dumps({"status": "ready"} if ok else {"status": "not_ready", "reason": why}).encode()
                    status, content_type = (200 if ok else 503), "application/json"
                else:
                    body, status, content_type = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per scrape is noise

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
