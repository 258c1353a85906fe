"""``tokenbus bench engine`` on the tiny model: every system runs, answers whole, is compared.

Three real vLLM starts (tokenbus's worker, vLLM's server, AsyncLLM): a few minutes on two
cores. Nothing here asserts a speed; only that each system answered every request with every
token, and that the ratios were computed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bench.engine import add_arguments, run_engine
from bench.engine_setup import check_server_flags, engine_setup, server_flags
from bench.engine_systems import SYSTEMS
from bench.engine_table import percentile
from tests.conftest import report


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_percentile_interpolates_and_skips_nan() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, math.nan, 3.0], 100) == 3.0
    assert math.isnan(percentile([], 50))


def test_vllm_server_flags_give_the_workers_engine_arguments(tmp_path: Path) -> None:
    setup = engine_setup("tiny", tmp_path, slots=64)
    assert setup.args["served_model_name"] == ["tiny"]
    assert setup.args["max_num_seqs"] == 64 and setup.args["max_model_len"] == 512
    wrong, _ = check_server_flags(setup.args, server_flags(setup.args))
    assert wrong == []


def test_engine_scenario_on_the_tiny_model_runs_and_compares_every_system() -> None:
    args = _args("--models", "tiny", "--concurrency", "1,2", "--max-tokens", "8", "--repeats", "1")
    section = run_engine(args)
    report("bench engine smoke (tiny model, 8 tokens):\n" + section.table)
    assert section.ok, section.text()
    rows = [r for r in section.rows if "system" in r]
    assert {(r["system"], r["concurrency"]) for r in rows} == {
        (s, c) for s in SYSTEMS for c in (1, 2)
    }
    for row in rows:
        # 8 answers per level (the default: at least 8), 8 tokens each: the tiny model never
        # ends an answer by itself, so every system must deliver exactly that many.
        assert row["requests"] == 8, row
        assert row["tokens"] == 8 * 8, row
        assert row["errors"] == 0, row
        assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0, row
    # The same prompts, rendered alike by all three: the same prompt tokens.
    for c in (1, 2):
        prompts = {r["prompt_tokens"] for r in rows if r["concurrency"] == c}
        assert len(prompts) == 1, prompts
    ratios = [r for r in section.rows if "ratio" in r]
    assert {(r["ratio"], r["concurrency"]) for r in ratios} == {
        (f"tokenbus/{b}", c) for b in ("vllm-server", "asyncllm") for c in (1, 2)
    }
    for r in ratios:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
    assert "tokenbus/vllm-server" in section.table and "tokenbus/asyncllm" in section.table
