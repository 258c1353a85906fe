"""``tokenbus bench engine``: a real model through tokenbus, vLLM's server and AsyncLLM.

For each model (the tiny random one, built offline, and the bundled SmolLM2), each repeat runs
the three systems in turn, one at a time (A B C A B C ...), each started once and driven through
every concurrency level: a warm-up answer, then ``requests`` greedy answers of ``max_tokens``
per level, ``concurrency`` at a time. The same engine arguments (the worker's own, see
``bench.engine_setup``), the same prompts, and for tokenbus and vLLM's server the same
``openai`` streaming client. The table gives each figure's median over the repeats and
tokenbus's ratio to each baseline.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine_setup import MODELS, check_server_flags, engine_setup, server_flags
from bench.engine_systems import RUNNERS, SYSTEMS, Run
from bench.engine_table import render, rows_of
from bench.report import Section


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--models", default=",".join(MODELS), help="engine: comma-separated, of tiny, smollm2"
    )
    g.add_argument("--concurrency", default="1,16,64", help="engine: concurrency levels (1,16,64)")
    g.add_argument("--max-tokens", type=int, default=128, help="engine: tokens per answer (128)")
    g.add_argument(
        "--requests",
        default="0",
        help="engine: answers per level, one number or one per level (0: twice the "
        "concurrency, at least 8)",
    )
    g.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="engine: comma-separated, of tokenbus, vllm-server, asyncllm (all)",
    )
    g.add_argument(
        "--engine-args",
        default="",
        metavar="JSON",
        help="engine: more AsyncEngineArgs for every system (as TOKENBUS_ENGINE_ARGS)",
    )


def say(line: str) -> None:
    print(f"tokenbus bench: {line}", file=sys.stderr, flush=True)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def levels_of(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(concurrency, answers) of each level."""
    levels = [int(c) for c in _csv(args.concurrency)]
    counts = [int(n) for n in _csv(str(args.requests))] or [0]
    if len(counts) == 1:
        counts *= len(levels)
    if len(counts) != len(levels):
        raise ValueError("--requests: one number, or one per --concurrency level")
    return [(c, n or max(2 * c, 8)) for c, n in zip(levels, counts, strict=True)]


def run_engine(args: argparse.Namespace) -> Section:
    started = time.monotonic()
    try:
        levels = levels_of(args)
    except ValueError as exc:
        return Section("engine", str(exc), ok=False)
    models, systems = _csv(args.models), _csv(args.systems)
    unknown = [m for m in models if m not in MODELS] + [s for s in systems if s not in SYSTEMS]
    if unknown:
        return Section("engine", f"unknown model or system: {', '.join(unknown)}", ok=False)
    table: list[list[object]] = []
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="tokenbus-bench-engine-") as tmp:
        for model in models:
            workdir = Path(tmp) / model
            say(f"{model}: preparing the model and its engine arguments ...")
            setup = engine_setup(
                model, workdir, slots=max(c for c, _ in levels), extra_args=args.engine_args
            )
            flags = server_flags(setup.args)
            wrong, other = check_server_flags(setup.args, flags)
            if wrong:
                ok = False
                notes.append(f"{model}: vLLM's server would not get the same engine: {wrong}")
            if other:
                notes.append(f"{model}: vLLM's server's own defaults differ in: {other}")
            say(f"{model}: engine arguments {setup.describe()}")
            notes.append(f"{model} engine arguments (all three systems): {setup.describe()}")
            notes.append(f"{model} vLLM server flags: {shlex.join(flags)}")
            runs: dict[str, list[Run]] = {s: [] for s in systems}
            for repeat in range(args.repeats):
                for system in systems:
                    say(f"{model} {system}: starting (repeat {repeat + 1} of {args.repeats})")
                    rundir = workdir / f"{system}-{repeat + 1}"
                    rundir.mkdir(parents=True)
                    try:
                        run = RUNNERS[system](setup, levels, args.max_tokens, rundir, say)
                    except Exception as exc:  # one failed start does not lose the others
                        ok = False
                        notes.append(f"{model} {system} repeat {repeat + 1} failed: {exc}"[:2000])
                        say(f"{model} {system}: FAILED: {exc}"[:2000])
                        continue
                    runs[system].append(run)
                    ok = ok and _complete(run, args.max_tokens, notes, model)
            model_table, model_rows = rows_of(model, runs, levels)
            table += model_table
            rows += model_rows
            notes += _startups(model, runs)
    total = time.monotonic() - started
    notes[:0] = [
        f"{len(models)} model(s) x {len(systems)} systems x {args.repeats} repeat(s), "
        f"interleaved; levels (concurrency:answers) "
        + ", ".join(f"{c}:{n}" for c, n in levels)
        + f"; {args.max_tokens} tokens per answer, greedy; total {total:.0f} s",
        "medians over repeats; ratios are tokenbus / baseline (tok/s: above 1 is tokenbus "
        "faster; times and CPU: above 1 is tokenbus slower or costlier)",
        "ITL: per answer, (last text - first text) / (tokens - 1), then p50/p99 over answers; "
        "CPU s/1k tok: CPU seconds of every process of the system (tokenbus: redis, gateway, "
        "worker and its engine core; vllm-server: its processes; asyncllm: the driver and its "
        "engine core) per 1000 answer tokens; client CPU: the openai client process's; "
        "others: cores busy with other processes meanwhile, on average (the noise)",
    ]
    return Section("engine", render(table), rows=rows, notes=notes, ok=ok)


def _complete(run: Run, max_tokens: int, notes: list[str], model: str) -> bool:
    """Whether every answer of ``run`` arrived; notes what failed. Short answers are noted
    (a real model may stop before max_tokens), never counted as failures."""
    good = True
    for level in run.levels:
        failed = [r for r in level.records if not r.ok]
        if failed:
            good = False
            notes.append(
                f"{model} {run.system} concurrency {level.concurrency}: {len(failed)} answers "
                f"failed, first: {failed[0].error}"
            )
        short = [r for r in level.records if r.ok and r.tokens < max_tokens]
        if short and model == "tiny":  # the tiny model never ends an answer by itself
            good = False
            notes.append(
                f"{model} {run.system} concurrency {level.concurrency}: {len(short)} answers "
                f"short of {max_tokens} tokens"
            )
    return good


def _startups(model: str, runs: dict[str, list[Run]]) -> list[str]:
    parts = []
    for system, system_runs in runs.items():
        times = [r.startup_s for r in system_runs]
        if times:
            parts.append(f"{system} {', '.join(f'{t:.0f}' for t in times)} s")
    return [f"{model} start-up to ready, each repeat: {'; '.join(parts) or 'none'}"]
