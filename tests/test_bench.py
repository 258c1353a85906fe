"""``tokenbus bench fabric capacity`` at a tiny size: tables and JSON rows, nothing lost.

Real processes (Redis, a gateway, a worker, the baseline, client processes), a few streams.
Nothing here asserts a speed: only that both systems delivered every token once and that
every figure and ratio was computed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import pytest

from bench import command, fabric
from bench.capacity import Climb, ladder, verdict
from bench.measure import cpu_seconds, percentile, rss_bytes

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", nargs="*")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default="")
    fabric.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_fabric_and_capacity_tables_and_rows(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(
        "fabric",
        "capacity",
        "--json",
        "--streams=20",
        "--tokens=10",
        "--repeats=1",
        "--clients=2",
        "--slack=60",
        "--capacity-start=20",
        "--capacity-max=20",
        "--capacity-rates=20",
        "--capacity-step-s=1",
        # Never a speed: any latency holds, so each step is decided by losses alone.
        "--capacity-p99-ms=60000",
    )
    assert command.cmd_bench(args) == 0
    out = capsys.readouterr().out
    for heading in ("## fabric", "## capacity", "SSE", "WS", "metric", "tokenbus", "baseline"):
        assert heading in out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    metrics = {(r["transport"], r["metric"]): r for r in rows if r.get("kind") == "metric"}
    counts = {(r["transport"], r["metric"]): r for r in rows if r.get("kind") == "count"}
    for transport in ("sse", "ws"):
        assert counts[(transport, "completed")]["tokenbus"] == 20
        assert counts[(transport, "completed")]["baseline"] == 20
        for key in ("lost", "duplicated", "unfinished", "refused"):
            assert counts[(transport, key)]["tokenbus"] == 0
            assert counts[(transport, key)]["baseline"] == 0
        for key in ("tokens_per_s", "cpu_us_per_token", "latency_p99_ms", "ttft_p50_ms"):
            row = metrics[(transport, key)]
            assert row["tokenbus"] > 0 and row["baseline"] > 0
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert metrics[(transport, "cpu_gateway_s")]["tokenbus"] > 0
        assert metrics[(transport, "cpu_baseline_s")]["baseline"] > 0

    runs = [r for r in rows if r.get("kind") == "run"]
    assert {(r["system"], r["transport"]) for r in runs} == {
        (s, t) for s in ("tokenbus", "baseline") for t in ("sse", "ws")
    }
    for run in runs:
        assert run["tokens"] == 20 * 10 and run["errors"] == []
        assert run["client_cpu_s"] > 0 and run["other_cpu_s"] >= 0

    (capacity,) = [r for r in rows if r.get("kind") == "capacity"]
    assert capacity["rate"] == 20
    assert capacity["tokenbus"] == 20 and capacity["baseline"] == 20
    assert capacity["tokenbus_capped"] and capacity["ratio"] == 1
    steps = [r for r in rows if r.get("kind") == "step"]
    assert sorted((r["system"], r["streams"]) for r in steps) == [
        ("baseline", 20),
        ("tokenbus", 20),
    ]


def test_ladder_climbs_then_refines_once() -> None:
    assert ladder(100, 4000) == [100, 200, 400, 800, 1600, 3200, 4000]
    assert ladder(100, 400) == [100, 200, 400]
    levels = ladder(100, 4000)
    c = Climb("tokenbus")
    assert c.next_level(levels) == 100
    c.steps[100], c.held = {}, 100
    assert c.next_level(levels) == 200
    c.steps[200], c.failed = {}, 200
    assert c.next_level(levels) == 150  # one step half-way
    c.steps[150], c.held = {}, 150
    assert c.next_level(levels) == 0


def test_verdict() -> None:
    held = {
        "streams": 10,
        "completed": 10,
        "lost": 0,
        "duplicated": 0,
        "errors": [],
        "refused": 0,
        "latency_p99_ms": 20.0,
    }
    assert verdict(held, 100) == ""
    assert verdict({**held, "latency_p99_ms": 150.0}, 100) == "p99 150 ms"
    assert "lost 3" in verdict({**held, "completed": 9, "lost": 3}, 100)


def test_measure_helpers() -> None:
    assert percentile([], 50) != percentile([], 50)  # nan
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert cpu_seconds(os.getpid()) > 0 and rss_bytes(os.getpid()) > 0
    assert math.isnan(cpu_seconds(2**22 + 12345)) and rss_bytes(2**22 + 12345) == 0
