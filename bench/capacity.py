"""``tokenbus bench capacity``: how many concurrent streams one gateway process holds.

At each rate (``--capacity-rates``, tokens/s per stream), concurrent SSE streams go up a
ladder (``--capacity-start``, doubling, up to ``--capacity-max``) until p99 added latency
passes ``--capacity-p99-ms`` or anything is lost, duplicated or refused (in each of
``--capacity-tries`` runs: one spike of other work on shared cores does not end the climb);
then one step half-way between the last level that held and the first that did not.
tokenbus (one gateway, ``--workers`` workers, Redis) and the baseline climb the same ladder,
step by step in turn.
Each step is a fresh system and short answers (``--capacity-step-s`` long, posted over half
that), so the whole ladder stays bounded in time.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from typing import Any

from bench.fabric import SYSTEMS, progress, run_one, trial
from bench.report import Section, grid, ratio
from bench.stack import Load
from bench.trial import Trial, complete


@dataclass
class Climb:
    """One system's way up the ladder at one rate."""

    system: str
    held: int = 0  # most streams that held
    failed: int = 0  # fewest that did not (0: none failed)
    why: str = ""  # what the failing step broke
    refined: bool = False  # the half-way step was tried
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)

    def next_level(self, ladder: list[int]) -> int:
        """The next level to try, or 0 when this system is done."""
        if self.failed:  # one step half-way, then done
            mid = (self.held + self.failed) // 2
            if self.refined or not self.held < mid < self.failed:
                return 0
            self.refined = True
            return mid
        higher = [n for n in ladder if n > self.held and n not in self.steps]
        return higher[0] if higher else 0


def ladder(start: int, cap: int) -> list[int]:
    levels, n = [], max(1, start)
    while n < cap:
        levels.append(n)
        n *= 2
    return [*levels, cap]


def verdict(figures: dict[str, Any], p99_bound_ms: float) -> str:
    """'' when the step held, else why not."""
    if not complete(figures):
        return (
            f"{figures['streams'] - figures['completed']} streams incomplete, "
            f"lost {figures['lost']}, duplicated {figures['duplicated']}"
        )
    if figures["refused"]:
        return f"{figures['refused']} jobs refused"
    p99 = figures["latency_p99_ms"]
    if math.isnan(p99) or p99 > p99_bound_ms:
        return f"p99 {p99:.0f} ms"
    return ""


def step_trial(system: str, streams: int, rate: float, args: argparse.Namespace) -> Trial:
    tokens = max(2, round(args.capacity_step_s * rate))
    t = trial(system, "sse", Load(streams, tokens, rate, args.ttft_ms), args)
    # Posted over half the answer's length: every stream is open and answering for the
    # other half; a few seconds of slack, so that a step far past capacity ends soon.
    return replace(t, ramp_s=args.capacity_step_s / 2, slack_s=15.0)


def climb(rate: float, args: argparse.Namespace) -> dict[str, Climb]:
    levels = ladder(args.capacity_start, args.capacity_max)
    climbs = {s: Climb(s) for s in SYSTEMS}
    while True:
        todo = [(s, c.next_level(levels)) for s, c in climbs.items()]
        todo = [(s, n) for s, n in todo if n]
        if not todo:
            return climbs
        for system, streams in todo:
            c = climbs[system]
            for attempt in range(1, max(1, args.capacity_tries) + 1):
                what = f"capacity at {rate:g} tokens/s, {streams} streams, try {attempt}"
                figures = run_one(step_trial(system, streams, rate, args), what)
                figures["tries"] = attempt
                c.steps[streams] = figures
                why = verdict(figures, args.capacity_p99_ms)
                if not why:  # held; a failed try is tried again (noise on shared cores)
                    break
            if why:
                if not c.failed or streams < c.failed:
                    c.failed, c.why = streams, why
                progress(f"  {system} did not hold {streams} streams: {why}")
            else:
                c.held = max(c.held, streams)


def run_capacity(args: argparse.Namespace) -> Section:
    rates = [float(r) for r in args.capacity_rates.split(",") if r.strip()]
    results = {rate: climb(rate, args) for rate in rates}
    return capacity_section(results, args)


def _rss(c: Climb) -> float:
    """Memory per connection at the largest step that held (or the smallest run)."""
    if not c.steps:
        return math.nan
    level = c.held if c.held else min(c.steps)
    return float(c.steps[level]["rss_per_conn_kib"])


def _max(c: Climb, cap: int) -> str:
    return f">={c.held}" if c.held >= cap else str(c.held)


def capacity_section(results: dict[float, dict[str, Climb]], args: argparse.Namespace) -> Section:
    summary: list[list[object]] = []
    detail: list[list[object]] = []
    rows: list[dict[str, Any]] = []
    ok = True
    cap = args.capacity_max
    for rate, climbs in results.items():
        mine, theirs = climbs["tokenbus"], climbs["baseline"]
        r = ratio(mine.held, theirs.held)
        summary.append(
            [
                f"{rate:g}",
                _max(mine, cap),
                _max(theirs, cap),
                "-" if math.isnan(r) else f"{r:.2f}x",
                round(_rss(mine), 1),
                round(_rss(theirs), 1),
                mine.why or "-",
                theirs.why or "-",
            ]
        )
        ok = ok and mine.held > 0 and theirs.held > 0
        row = {"kind": "capacity", "rate": rate, "ratio": r}
        for c in (mine, theirs):
            row[c.system] = c.held
            row[f"{c.system}_capped"] = c.held >= cap
            row[f"{c.system}_stopped_by"] = c.why
            row[f"{c.system}_rss_per_conn_kib"] = _rss(c)
        rows.append(row)
        for level in sorted(set(mine.steps) | set(theirs.steps)):
            cells: list[object] = [f"{rate:g}", level]
            for c in (mine, theirs):
                f = c.steps.get(level)
                cells.append("-" if f is None else _step_cell(f, args.capacity_p99_ms))
            noise = [
                c.steps[level].get("other_cpu_s") if level in c.steps else None
                for c in (mine, theirs)
            ]
            cells.append(" / ".join("-" if n is None else f"{n:.1f}" for n in noise))
            detail.append(cells)
            for c in (mine, theirs):
                if level in c.steps:
                    rows.append({"kind": "step", **c.steps[level]})
    header = ["tokens/s", "tokenbus max", "baseline max", "ratio", "tokenbus RSS KiB/conn"]
    header += ["baseline RSS KiB/conn", "tokenbus stopped by", "baseline stopped by"]
    table = grid(header, summary)
    table += "\n\nsteps (p99 added latency ms, held or not)\n\n"
    table += grid(["tokens/s", "streams", "tokenbus", "baseline", "other CPU s"], detail)
    notes = [
        f"one gateway + {args.workers} worker(s) + Redis against the one baseline process; SSE; "
        f"{args.clients} client processes; a step holds when p99 added latency <= "
        f"{args.capacity_p99_ms:g} ms and every token arrives once; ladder from "
        f"{args.capacity_start} doubling to {cap} (>= : the cap held), answers "
        f"{args.capacity_step_s:g} s long posted over {args.capacity_step_s / 2:g} s; a step "
        f"that did not hold was tried up to {args.capacity_tries} times.",
        "RSS KiB/conn: (gateway or baseline RSS while the streams are open - before) / streams, "
        "at the largest step that held. other CPU s: what other processes on the machine used "
        "during each step's run (tokenbus / baseline), i.e. noise.",
    ]
    title = "capacity: concurrent streams one gateway process holds"
    return Section(title, table, rows, notes, ok)


def _step_cell(f: dict[str, Any], bound: float) -> str:
    why = verdict(f, bound)
    p99 = f["latency_p99_ms"]
    shown = "-" if math.isnan(p99) else f"{p99:.0f}"
    return f"{shown} ok" if not why else f"{shown} no ({why})"
