"""Prometheus metrics of the async path: counters, gauges and histograms rendered as text.

Light on purpose (the worker's CPU per payment matters): an increment is a dict update keyed by a
tuple of label values, nothing is allocated per observation beyond that key, and the text is built
only when scraped (or reported to the parent process, every second). Gauges that are a view of live
state (breaker states, queue lengths) are read at render time through a callback, so the hot path
does not maintain them at all.

Conventions (Prometheus'): units last in the name (`_seconds`, `_ratio`), counters end in `_total`,
histograms are cumulative with a `+Inf` bucket, `_sum` and `_count`. Every label set of a metric is
bounded by what produces it (PSP names, outcomes, statuses, decline codes from a fixed vocabulary);
`SERIES_MAX` is the backstop past which a metric counts new label sets under `_other`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

# The most label sets one metric keeps; past it, new ones are counted under the value `_other`.
SERIES_MAX = 1000

# Seconds: from sub-millisecond to minutes (a payment waits for a PSP 50-300 ms, a timeout resolves
# after seconds, a pending_verification payment may take minutes).
LATENCY_BOUNDS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                       60.0, 300.0)

INF_LABEL = 'le="+Inf"'
Labels = tuple[str, ...]
GaugeReader = Callable[[], Iterable[tuple[Labels, float]]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Labels, values: Labels, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Counter:
    def __init__(self, name: str, help_text: str, labels: Labels = ()) -> None:
        assert name.endswith("_total"), name
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), n: float = 1) -> None:
        values = self.values
        try:
            values[labels] += n  # one lookup on the common path: a label set seen before
        except KeyError:
            if len(values) >= SERIES_MAX:
                labels = tuple("_other" for _ in labels)
            values[labels] = values.get(labels, 0) + n

    def value(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0)

    def render(self, out: list[str]) -> None:
        out += [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for labels, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.label_names, labels)} {_number(v)}")


class Gauge:
    """A gauge set by its owner (`set`) or read at render time (`reader`)."""

    def __init__(self, name: str, help_text: str, labels: Labels = (), reader: GaugeReader | None = None) -> None:
        self.name, self.help, self.label_names, self.reader = name, help_text, labels, reader
        self.values: dict[Labels, float] = {}

    def set(self, value: float, labels: Labels = ()) -> None:
        if labels in self.values or len(self.values) < SERIES_MAX:
            self.values[labels] = value

    def value(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0)

    def render(self, out: list[str]) -> None:
        rows = list(self.reader()) if self.reader is not None else list(self.values.items())
        out += [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for labels, v in sorted(rows):
            out.append(f"{self.name}{_labels(self.label_names, labels)} {_number(v)}")


class Histogram:
    def __init__(self, name: str, help_text: str, labels: Labels = (),
                 bounds: tuple[float, ...] = LATENCY_BOUNDS_S) -> None:
        self.name, self.help, self.label_names, self.bounds = name, help_text, labels, bounds
        # Per label set: one count per bound plus +Inf (not cumulative), then the sum.
        self.series: dict[Labels, list[float]] = {}

    def observe(self, value: float, labels: Labels = ()) -> None:
        row = self.series.get(labels)
        if row is None:  # a new label set (rare): bounded by SERIES_MAX
            if len(self.series) >= SERIES_MAX:
                labels = tuple("_other" for _ in labels)
                row = self.series.get(labels)
            if row is None:
                row = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def count(self, labels: Labels = ()) -> int:
        row = self.series.get(labels)
        return int(sum(row[:-1])) if row is not None else 0

    def render(self, out: list[str]) -> None:
        out += [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        names = self.label_names
        for labels, row in sorted(self.series.items()):
            row = list(row)
            cumulative = 0.0
            for bound, n in zip(self.bounds, row):
                cumulative += n
                le = 'le="' + str(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(names, labels, le)} {_number(cumulative)}")
            cumulative += row[len(self.bounds)]
            out.append(f"{self.name}_bucket{_labels(names, labels, INF_LABEL)} {_number(cumulative)}")
            out.append(f"{self.name}_sum{_labels(names, labels)} {_number(row[-1])}")
            out.append(f"{self.name}_count{_labels(names, labels)} {_number(cumulative)}")


Metric = Counter | Gauge | Histogram


class Registry:
    """The metrics of one process part (the worker, the PSP clients); `render` is the exposition text."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: Metric) -> Metric:
        assert all(m.name != metric.name for m in self.metrics), metric.name
        self.metrics.append(metric)
        return metric

    def counter(self, name: str, help_text: str, labels: Labels = ()) -> Counter:
        c = Counter(name, help_text, labels)
        self.add(c)
        return c

    def gauge(self, name: str, help_text: str, labels: Labels = (), reader: GaugeReader | None = None) -> Gauge:
        g = Gauge(name, help_text, labels, reader)
        self.add(g)
        return g

    def histogram(self, name: str, help_text: str, labels: Labels = (),
                  bounds: tuple[float, ...] = LATENCY_BOUNDS_S) -> Histogram:
        h = Histogram(name, help_text, labels, bounds)
        self.add(h)
        return h

    def names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def render(self) -> str:
        out: list[str] = []
        for m in self.metrics:
            m.render(out)
        return "\n".join(out) + "\n" if out else ""
