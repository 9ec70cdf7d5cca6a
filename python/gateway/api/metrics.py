"""Prometheus counters kept on the Python side: requests by route and status, HTTP latency."""

from __future__ import annotations

import bisect
from collections import defaultdict

_BOUNDS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


class HttpMetrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: defaultdict[str, float] = defaultdict(float)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] += 1
        buckets = self.latency.get(route)
        if buckets is None:
            buckets = self.latency[route] = [0] * (len(_BOUNDS_S) + 1)
        buckets[bisect.bisect_left(_BOUNDS_S, seconds)] += 1
        self.latency_sum[route] += seconds

    def render(self) -> str:
        lines = [
            "# HELP gateway_http_requests_total HTTP requests by route and status.",
            "# TYPE gateway_http_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'gateway_http_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP gateway_http_request_seconds Time from request read to response, per route.",
            "# TYPE gateway_http_request_seconds histogram",
        ]
        for route, buckets in sorted(self.latency.items()):
            cumulative = 0
            for bound, n in zip(_BOUNDS_S, buckets):
                cumulative += n
                lines.append(f'gateway_http_request_seconds_bucket{{route="{route}",le="{bound}"}} {cumulative}')
            cumulative += buckets[-1]
            lines.append(f'gateway_http_request_seconds_bucket{{route="{route}",le="+Inf"}} {cumulative}')
            lines.append(f'gateway_http_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]}')
            lines.append(f'gateway_http_request_seconds_count{{route="{route}"}} {cumulative}')
        return "\n".join(lines) + "\n"
