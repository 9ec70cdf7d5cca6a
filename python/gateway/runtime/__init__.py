"""The only place that knows which mode runs: builds stores, admission, feed and change bus.

`build_runtime` picks `EmbeddedRuntime` (SQLite, the WAL tailer, a worker child process) or
`ClusterRuntime` (PostgreSQL, Redis, the Kafka relay, `gateway worker` processes) from
`[server] mode`; the API and the workers only see the `Runtime` interface (runtime/base.py).
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import Config
from gateway.runtime.base import Runtime


def build_runtime(config: Config, data_dir: Path) -> Runtime:
    if config.server.mode == "cluster":
        from gateway.runtime.cluster import ClusterRuntime

        return ClusterRuntime(config, data_dir)
    from gateway.runtime.embedded import EmbeddedRuntime

    return EmbeddedRuntime(config, data_dir)
