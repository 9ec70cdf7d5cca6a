"""The metric names the gateway exports, for the checks of the alert rules, the dashboard and the docs.

Names come from what the code renders: the `# TYPE` lines of a live embedded gateway's /metrics (with
its worker child's), plus the families that only cluster processes export, read from the `# TYPE`
lines and registry calls of runtime/cluster.py and runtime/cluster_worker.py.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TYPE = re.compile(r"^# TYPE (gateway_[a-z0-9_]+) (counter|gauge|histogram|summary|untyped)$", re.MULTILINE)
_SUFFIXES = ("_bucket", "_sum", "_count")
# Prometheus' own series, available for every target.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def families(metrics_text: str) -> dict[str, str]:
    """{name: type} of every `# TYPE` line."""
    return dict(_TYPE.findall(metrics_text))


def cluster_only_names() -> set[str]:
    names = set()
    cluster = (REPO / "python/gateway/runtime/cluster.py").read_text()
    names.update(re.findall(r"# TYPE (gateway_[a-z0-9_]+) ", cluster))
    worker = (REPO / "python/gateway/runtime/cluster_worker.py").read_text()
    names.update(re.findall(r'\.(?:counter|gauge|histogram)\(\s*"(gateway_[a-z0-9_]+)"', worker))
    assert "gateway_feed_consumer_lag_messages" in names
    return names


def series_names(metrics_text: str) -> set[str]:
    """Every name a query may use: families, and `_bucket`/`_sum`/`_count` of histograms."""
    out = set()
    for name, kind in families(metrics_text).items():
        out.add(name)
        if kind == "histogram":
            out.update(name + s for s in _SUFFIXES)
    return out


_IDENT = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b")
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "delta", "deriv",
    "histogram_quantile", "predict_linear", "time", "and", "or", "unless", "on", "ignoring", "group_left",
    "group_right", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "le", "offset", "bool", "vector",
    "scalar", "label_replace", "avg_over_time", "max_over_time", "min_over_time", "absent",
}


def query_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers, strings, durations and functions removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables ($__rate_interval, $instance)
    names = set()
    for m in _IDENT.finditer(expr):
        word = m.group(1)
        if word in PROMQL_WORDS or word[0].isdigit():
            continue
        names.add(word)
    return names
