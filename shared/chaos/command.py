"""``tokenbus chaos``: every fault scenario at scale, one table row each."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from shared.chaos.report import Row, table
from shared.chaos.scenarios import SCENARIOS, Load, run_scenario


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chaos = sub.add_parser(
        "chaos",
        help="inject faults (kill -9, SIGSTOP, SIGTERM, Redis restart, ...) into a local stack",
        description="Start Redis, 2 gateways and 2 synthetic-engine workers on 127.0.0.1 for "
        "each scenario, stream answers to SSE and WebSocket clients, inject the fault mid-answer "
        "and count completed, lost, duplicated, restarted and stuck streams.",
    )
    chaos.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which to run (default: all): {', '.join(SCENARIOS)}",
    )
    chaos.add_argument("--streams", type=int, default=500, help="concurrent streams (500)")
    chaos.add_argument("--tokens", type=int, default=40, help="tokens per answer (40)")
    chaos.add_argument("--rate", type=float, default=20.0, help="tokens/s per answer (20)")
    chaos.add_argument("--lease-ttl", type=float, default=2.0, help="workers' lease TTL, s (2)")
    chaos.add_argument("--timeout", type=float, default=180.0, help="per scenario, s (180)")
    chaos.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    chaos.set_defaults(func=cmd_chaos)


def cmd_chaos(args: argparse.Namespace) -> int:
    names = list(args.scenarios) or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"tokenbus chaos: unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
        return 2
    load = Load(
        streams=args.streams,
        tokens=args.tokens,
        rate=args.rate,
        lease_ttl_s=args.lease_ttl,
        timeout_s=args.timeout,
    )
    print(
        f"tokenbus chaos: {load.streams} streams x {load.tokens} tokens at {load.rate} tokens/s, "
        f"2 gateways, 2 workers (synthetic engine), lease TTL {load.lease_ttl_s} s; "
        "half SSE, half WebSocket",
        flush=True,
    )
    rows: list[Row] = []
    for name in names:
        started = time.monotonic()
        print(f"tokenbus chaos: running {name} ...", flush=True)
        row = asyncio.run(run_scenario(name, load))
        rows.append(row)
        took = time.monotonic() - started
        print(f"tokenbus chaos: {name} done in {took:.0f} s: {'ok' if row.ok else 'FAILED'}")
        if args.json:
            print(json.dumps(row.as_dict()), flush=True)
    print(table(rows), flush=True)
    sys.stdout.flush()
    return 0 if all(r.ok for r in rows) else 1
