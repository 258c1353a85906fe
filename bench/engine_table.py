"""The engine scenario's figures: each level's, their medians over repeats, and the ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.engine_systems import Run
from bench.engine_workload import Level
from bench.report import grid, median, ratio


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated; nan with no values."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    at = (len(data) - 1) * q / 100
    low = math.floor(at)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (at - low)


def figures(level: Level) -> dict[str, float]:
    """One level's figures (times in ms, CPU in seconds per 1000 answer tokens)."""
    ok = [r for r in level.records if r.ok]
    tokens = sum(r.tokens for r in level.records)
    per_k = 1000 / tokens if tokens else math.nan
    return {
        "tokens_per_s": tokens / level.wall_s if level.wall_s else math.nan,
        "ttft_p50_ms": 1000 * percentile([r.ttft for r in ok], 50),
        "ttft_p99_ms": 1000 * percentile([r.ttft for r in ok], 99),
        "itl_p50_ms": 1000 * percentile([r.itl for r in ok], 50),
        "itl_p99_ms": 1000 * percentile([r.itl for r in ok], 99),
        "e2e_p50_s": percentile([r.e2e for r in ok], 50),
        "gap_p99_ms": 1000 * percentile([r.max_gap for r in ok], 99),
        "tokens": float(tokens),
        "prompt_tokens": float(sum(r.prompt_tokens for r in ok)),
        "chunks_per_answer": sum(r.chunks for r in ok) / len(ok) if ok else math.nan,
        "errors": float(len(level.records) - len(ok)),
        "system_cpu_s_per_1k": level.system_cpu_s * per_k,
        "client_cpu_s_per_1k": level.client_cpu_s * per_k,
        "other_cores": level.other_cpu_s / level.wall_s if level.wall_s else math.nan,
    }


#: What the table shows of each figure: (header, key).
COLUMNS = (
    ("tok/s", "tokens_per_s"),
    ("TTFT p50 ms", "ttft_p50_ms"),
    ("TTFT p99 ms", "ttft_p99_ms"),
    ("ITL p50 ms", "itl_p50_ms"),
    ("ITL p99 ms", "itl_p99_ms"),
    ("e2e p50 s", "e2e_p50_s"),
    ("tokens", "tokens"),
    ("CPU s/1k tok", "system_cpu_s_per_1k"),
    ("client CPU", "client_cpu_s_per_1k"),
    ("others", "other_cores"),
)
#: Columns whose ratio means something (tokens and CPU are shown, not compared).
RATIO_KEYS = {
    "tokens_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "e2e_p50_s",
    "system_cpu_s_per_1k",
}
BASELINES = ("vllm-server", "asyncllm")


def medians(runs: Sequence[Run], concurrency: int) -> dict[str, float]:
    """Each figure's median over the runs (repeats) that reached ``concurrency``."""
    per_run = [figures(lv) for run in runs for lv in run.levels if lv.concurrency == concurrency]
    if not per_run:
        return {}
    out = {key: median([f[key] for f in per_run]) for key in per_run[0]}
    out["errors"] = sum(f["errors"] for f in per_run)
    out["repeats"] = float(len(per_run))
    return out


def rows_of(
    model: str, runs: dict[str, list[Run]], levels: Sequence[tuple[int, int]]
) -> tuple[list[list[object]], list[dict[str, Any]]]:
    """Table rows (each system, then tokenbus over each baseline) and JSON rows, per level."""
    table: list[list[object]] = []
    json_rows: list[dict[str, Any]] = []
    for concurrency, requests in levels:
        got = {system: medians(system_runs, concurrency) for system, system_runs in runs.items()}
        for system, fig in got.items():
            if not fig:
                table.append([model, concurrency, system, *["-"] * len(COLUMNS)])
                continue
            table.append([model, concurrency, system, *(_show(fig[k]) for _, k in COLUMNS)])
            per_repeat = [
                figures(lv) for run in runs[system] for lv in run.levels
                if lv.concurrency == concurrency
            ]  # fmt: skip
            json_rows.append(
                {
                    "model": model,
                    "concurrency": concurrency,
                    "requests": requests,
                    "system": system,
                    **fig,
                    "startup_s": [round(r.startup_s, 1) for r in runs[system]],
                    "per_repeat": per_repeat,
                }
            )
        ours = got.get("tokenbus", {})
        for base in BASELINES:
            theirs = got.get(base, {})
            if not ours or not theirs:
                continue
            cells = [
                f"{ratio(ours[k], theirs[k]):.2f}x" if k in RATIO_KEYS else "" for _, k in COLUMNS
            ]
            table.append(["", "", f"tokenbus/{base}", *cells])
            json_rows.append(
                {
                    "model": model,
                    "concurrency": concurrency,
                    "ratio": f"tokenbus/{base}",
                    **{k: ratio(ours[k], theirs[k]) for k in RATIO_KEYS},
                }
            )
    return table, json_rows


def _show(value: float) -> object:
    if math.isnan(value):
        return "-"
    if value >= 100:
        return round(value)
    return float(f"{value:.3g}")


def render(rows: Sequence[Sequence[object]]) -> str:
    return grid(["model", "conc", "system", *(h for h, _ in COLUMNS)], rows)
