"""The gateway's lock-free counter and histogram are exposed as prometheus_client's own are."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.loop_metrics import LoopCounter, LoopHistogram

Make = Callable[[CollectorRegistry], tuple[Any, Any]]


def _exposition(make: Make) -> str:
    registry = CollectorRegistry()
    histogram, counter = make(registry)
    for amount in (0.0, 0.0005, 0.001, 0.0011, 0.25, 3.0, 100.0):
        histogram.observe(amount)
    counter.labels("ws").inc(3)
    counter.labels("sse")
    counter.labels("ws").inc()
    text = generate_latest(registry).decode()
    # Creation times differ by construction; everything else must be the same.
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 <t>", text)


def _reference(registry: CollectorRegistry) -> tuple[Any, Any]:
    return (
        Histogram("tb_latency_seconds", "Latency.", buckets=(0.001, 0.25, 1.0), registry=registry),
        Counter("tb_events", "Events.", ["transport"], registry=registry),
    )


def _loop(registry: CollectorRegistry) -> tuple[Any, Any]:
    return (
        LoopHistogram(
            "tb_latency_seconds", "Latency.", buckets=(0.001, 0.25, 1.0), registry=registry
        ),
        LoopCounter("tb_events", "Events.", ["transport"], registry=registry),
    )


def test_the_exposition_is_prometheus_clients() -> None:
    assert _exposition(_loop) == _exposition(_reference)


def test_a_counter_refuses_to_go_down_or_wrong_labels() -> None:
    counter = LoopCounter("tb_c", "C.", ["transport"], registry=CollectorRegistry())
    with pytest.raises(ValueError):
        counter.labels("ws").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("ws", "extra")
