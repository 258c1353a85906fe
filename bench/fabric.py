"""``tokenbus bench fabric``: tokenbus against a broker-less in-process server, same load.

N streams of T tokens at R tokens/s each from the synthetic engine, over SSE and over
WebSocket. tokenbus is a private Redis, one gateway and ``--workers`` workers; the baseline is
``bench.baseline`` (one process running the same engine schedule). Every repeat runs both,
alternating which goes first; the table gives the medians over repeats and
tokenbus / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bench.report import Section, grid, median, ratio
from bench.stack import Load
from bench.trial import Trial, complete, run_trial

SYSTEMS = ("tokenbus", "baseline")

#: The table's rows: label, figure, how many decimals (None: as report.grid prints it).
METRICS: tuple[tuple[str, str], ...] = (
    ("delivered tokens/s", "tokens_per_s"),
    ("delivered events/s", "events_per_s"),
    ("added latency p50 ms", "latency_p50_ms"),
    ("added latency p99 ms", "latency_p99_ms"),
    ("added latency max ms", "latency_max_ms"),
    ("token lateness p50 ms", "lateness_p50_ms"),
    ("token lateness p99 ms", "lateness_p99_ms"),
    ("TTFT p50 ms", "ttft_p50_ms"),
    ("TTFT p99 ms", "ttft_p99_ms"),
    ("job POST p50 ms", "post_p50_ms"),
    ("job POST p99 ms", "post_p99_ms"),
    ("server CPU s", "cpu_server_s"),
    ("  gateway CPU s", "cpu_gateway_s"),
    ("  worker CPU s", "cpu_worker_s"),
    ("  redis CPU s", "cpu_redis_s"),
    ("  baseline CPU s", "cpu_baseline_s"),
    ("server CPU us/token", "cpu_us_per_token"),
    ("client CPU s", "client_cpu_s"),
    ("other processes' CPU s (noise)", "other_cpu_s"),
    ("RSS KiB/connection", "rss_per_conn_kib"),
)
#: Summed over repeats, not medians: one lost token in any run is one too many.
COUNTS: tuple[tuple[str, str], ...] = (
    ("streams completed", "completed"),
    ("streams unfinished at the deadline", "unfinished"),
    ("lost tokens", "lost"),
    ("duplicated tokens", "duplicated"),
    ("jobs refused (429/503)", "refused"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fabric and capacity")
    g.add_argument("--streams", type=int, default=1000, help="fabric: concurrent streams (1000)")
    g.add_argument("--tokens", type=int, default=100, help="fabric: tokens per answer (100)")
    g.add_argument("--rate", type=float, default=20.0, help="tokens/s of each answer (20)")
    g.add_argument("--ttft-ms", type=float, default=50.0, help="synthetic time to first token")
    g.add_argument(
        "--transports", default="sse,ws", help="fabric: comma-separated, of sse, ws (sse,ws)"
    )
    g.add_argument("--clients", type=int, default=4, help="client processes driving load (4)")
    g.add_argument("--workers", type=int, default=1, help="tokenbus synthetic workers (1)")
    g.add_argument("--ramp", type=float, default=1.0, help="seconds over which jobs are posted")
    g.add_argument(
        "--slack",
        type=float,
        default=120.0,
        help="fabric: seconds past an answer's own length before a stream is given up (120)",
    )
    g.add_argument(
        "--capacity-max", type=int, default=4000, help="capacity: most streams tried (4000)"
    )
    g.add_argument("--capacity-start", type=int, default=100, help="capacity: first step (100)")
    g.add_argument(
        "--capacity-rates", default="20,1", help="capacity: tokens/s per stream to try (20,1)"
    )
    g.add_argument(
        "--capacity-step-s", type=float, default=8.0, help="capacity: answer length, s (8)"
    )
    g.add_argument(
        "--capacity-p99-ms", type=float, default=100.0, help="capacity: p99 latency bound (100)"
    )
    g.add_argument(
        "--capacity-tries",
        type=int,
        default=2,
        help="capacity: runs of a step before it counts as not held (2)",
    )
    g.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="py-spy the gateway and worker in an extra, unreported tokenbus run per transport",
    )


def progress(text: str) -> None:
    print(f"tokenbus bench: {text}", file=sys.stderr, flush=True)


def trial(system: str, transport: str, load: Load, args: argparse.Namespace) -> Trial:
    return Trial(
        system,
        transport,
        load,
        clients=args.clients,
        ramp_s=args.ramp,
        workers=args.workers,
        slack_s=args.slack,
    )


def run_one(t: Trial, what: str) -> dict[str, Any]:
    progress(f"{what}: {t.label()} ...")
    figures = asyncio.run(run_trial(t))
    progress(
        f"  {figures['completed']}/{figures['streams']} completed, "
        f"{figures['tokens_per_s']:.0f} tokens/s, latency p99 {figures['latency_p99_ms']:.1f} ms, "
        f"server CPU {figures['cpu_server_s']:.2f} s (other processes "
        f"{figures.get('other_cpu_s', math.nan):.1f} s), lost {figures['lost']}, "
        f"duplicated {figures['duplicated']}"
        + (f", errors: {figures['errors'][:2]}" if figures["errors"] else "")
    )
    return figures


def run_fabric(args: argparse.Namespace) -> Section:
    load = Load(args.streams, args.tokens, args.rate, args.ttft_ms)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for transport in transports:
        if args.profile:
            profiled = replace(trial("tokenbus", transport, load, args), profile_dir=args.profile)
            run_one(profiled, f"{transport} profiled (py-spy, not reported)")
        for r in range(args.repeats):
            order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
            for system in order:
                what = f"fabric {transport} repeat {r + 1}/{args.repeats}"
                runs.setdefault((system, transport), []).append(
                    run_one(trial(system, transport, load, args), what)
                )
    return fabric_section(load, args, transports, runs)


def fabric_section(
    load: Load,
    args: argparse.Namespace,
    transports: Sequence[str],
    runs: dict[tuple[str, str], list[dict[str, Any]]],
) -> Section:
    tables, rows = [], []
    ok = True
    for transport in transports:
        mine, theirs = runs[("tokenbus", transport)], runs[("baseline", transport)]
        ok = ok and all(complete(f) for f in [*mine, *theirs])
        table_rows: list[list[object]] = []
        for label, key in METRICS:
            a, b = _median(mine, key), _median(theirs, key)
            if math.isnan(a) and math.isnan(b):
                continue
            r = ratio(a, b)
            table_rows.append([label, _fmt(a), _fmt(b), _fmt_ratio(r)])
            rows.append(_row("metric", transport, key, a, b, r))
        for label, key in COUNTS:
            a, b = sum(f[key] for f in mine), sum(f[key] for f in theirs)
            table_rows.append([label, a, b, ""])
            rows.append(_row("count", transport, key, a, b, ratio(a, b)))
        tables.append(
            f"{transport.upper()}\n\n"
            + grid(["metric", "tokenbus", "baseline", "ratio"], table_rows)
        )
        for f in [*mine, *theirs]:
            rows.append({"kind": "run", **f})
    notes = [
        f"{load.streams} streams x {load.tokens} tokens at {load.rate:g} tokens/s each "
        f"(synthetic engine, first token after {load.ttft_ms:g} ms), jobs posted over "
        f"{args.ramp:g} s by {args.clients} client processes; medians of {args.repeats} "
        "repeats, tokenbus and baseline alternating; ratio = tokenbus / baseline.",
        f"tokenbus: Redis + 1 gateway + {args.workers} worker(s); baseline: bench/baseline.py, "
        "one aiohttp process running the same engine in-process.",
        "added latency: client receive time - the delta's t (when the engine emitted it); "
        "TTFT: job POST sent -> first delta received; token lateness: receive time - when the "
        "token was due had the answer started at its POST (TTFT, then the rate); counts are "
        "summed over repeats.",
    ]
    errors = {e for f in (x for v in runs.values() for x in v) for e in f["errors"]}
    notes += [f"error: {e}" for e in sorted(errors)[:5]]
    title = "fabric: tokenbus vs a broker-less in-process server"
    return Section(title, "\n\n".join(tables), rows, notes, ok)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [float(f[key]) for f in runs if key in f and not math.isnan(float(f[key]))]
    return median(values)


def _row(kind: str, transport: str, key: str, a: float, b: float, r: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "transport": transport,
        "metric": key,
        "tokenbus": a,
        "baseline": b,
        "ratio": r,
    }


def _fmt(value: float) -> object:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return round(value)
    return round(value, 2) if abs(value) >= 1 else round(value, 3)


def _fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) or math.isinf(value) else f"{value:.2f}x"
