"""A counter and a histogram for the event loop's hot path, exposed as prometheus_client's are.

prometheus_client guards every value with a lock and checks labels and exemplars on each call:
about a microsecond and a half an observation here, paid per event per client. A gateway
touches its metrics from its event loop only (scrapes included), so these keep plain numbers
instead and render, at scrape time, the same samples (names, labels, ``_created``) that a
``prometheus_client.Counter`` or ``Histogram`` of the same name would.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

#: How prometheus_client writes a bucket's bound ("+Inf", "0.25").
_bound_text: Callable[[float], str] = floatToGoString


class LoopCounter:
    """``Counter(name, documentation, labelnames)``; ``labels(...)`` gives the child to ``inc``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> CounterChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = CounterChild()
        return child

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self._name, self._documentation, "counter")
        for values, child in self._children.items():
            labels = dict(zip(self._labelnames, values, strict=True))
            metric.add_sample(f"{self._name}_total", labels, child.value)
            metric.add_sample(f"{self._name}_created", labels, child.created)
        yield metric


class CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class LoopHistogram:
    """``Histogram(name, documentation, buckets=...)``, without labels."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount, as prometheus_client counts it.
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self._name, self._documentation, "histogram")
        total = 0
        for bound, count in zip(self._bounds, self._counts, strict=True):
            total += count
            metric.add_sample(f"{self._name}_bucket", {"le": _bound_text(bound)}, total)
        metric.add_sample(f"{self._name}_count", {}, total)
        metric.add_sample(f"{self._name}_sum", {}, self._sum)
        metric.add_sample(f"{self._name}_created", {}, self._created)
        yield metric
