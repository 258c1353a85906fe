"""``tokenbus bench``: each scenario against its baseline in the same run, printed as ratios."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

from bench.report import Section

SCENARIOS = ("fabric", "capacity", "engine")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure tokenbus against a baseline in the same run (fabric, capacity, engine)",
        description="Start everything measured on 127.0.0.1, drive it from separate client "
        "processes and print each figure beside its baseline's, as a ratio. Repeats interleave "
        "tokenbus and the baseline; medians are reported.",
    )
    bench.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which to run (default: fabric capacity engine): {', '.join(SCENARIOS)}",
    )
    bench.add_argument("--repeats", type=int, default=3, help="interleaved runs per figure (3)")
    bench.add_argument("--json", action="store_true", help="also print every row as JSON")
    bench.add_argument("--out", default="", help="also write the report (markdown) to this file")
    from bench import engine, fabric

    fabric.add_arguments(bench)
    engine.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)


def _runner(name: str) -> Callable[[argparse.Namespace], Section]:
    if name == "fabric":
        from bench.fabric import run_fabric

        return run_fabric
    if name == "capacity":
        from bench.capacity import run_capacity

        return run_capacity
    from bench.engine import run_engine

    return run_engine


def cmd_bench(args: argparse.Namespace) -> int:
    names = list(args.scenarios) or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"tokenbus bench: unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
        return 2
    head = (
        f"tokenbus bench {' '.join(names)} on {platform.node()} ({platform.machine()}, "
        f"{_cpus()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(head, flush=True)
    sections: list[Section] = []
    for name in names:
        started = time.monotonic()
        print(f"tokenbus bench: running {name} ...", flush=True)
        section = _runner(name)(args)
        sections.append(section)
        print(section.text(), flush=True)
        print(f"tokenbus bench: {name} took {time.monotonic() - started:.0f} s", flush=True)
        if args.json:
            for row in section.rows:
                print(json.dumps({"scenario": name, **row}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# {head}\n\n" + "\n".join(s.text() for s in sections))
    sys.stdout.flush()
    return 0 if all(s.ok for s in sections) else 1


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
