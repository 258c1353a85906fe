"""The ceiling of the engine scenario: vLLM's ``AsyncLLM`` driven in-process, no HTTP at all.

``python -m bench.engine_asyncllm --engine-args '{...}' ...`` builds the engine from the very
``AsyncEngineArgs`` the tokenbus worker and vLLM's server get, renders each chat prompt as both
of them do (the model's chat template, then token ids without added special tokens), and
streams ``RequestOutputKind.DELTA`` outputs, greedy, ``max_tokens`` long. One warm-up answer,
then every level; the levels go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bench.engine_client import parse_levels, say
from bench.engine_workload import Clock, Level, Record, messages, run_levels


class InProcess:
    def __init__(self, engine_args: dict[str, Any], max_tokens: int) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm: Any = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
        self.tokenizer: Any = self.llm.get_tokenizer()
        self.max_tokens = max_tokens

    def render(self, level: int, index: int) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages(level, index), tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def send(self, level: int, index: int) -> Record:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        clock = Clock()
        ids = self.render(level, index)
        params = SamplingParams(
            n=1, temperature=0.0, max_tokens=self.max_tokens, output_kind=RequestOutputKind.DELTA
        )
        tokens = 0
        request_id = f"bench-{level}-{index}-{uuid.uuid4().hex[:8]}"
        try:
            async for out in self.llm.generate({"prompt_token_ids": ids}, params, request_id):
                output = out.outputs[0]
                tokens += len(output.token_ids)
                clock.text(output.text)
        except Exception as exc:  # any failure is the record's, the run goes on
            return clock.done(tokens, f"{type(exc).__name__}: {exc}"[:300], len(ids))
        return clock.done(tokens, prompt_tokens=len(ids))

    def close(self) -> None:
        llm, self.llm = self.llm, None
        llm.shutdown()
        del llm
        gc.collect()  # now, not from __del__ at interpreter exit, when vLLM's globals are gone


async def drive(args: argparse.Namespace) -> tuple[float, list[Level]]:
    started = time.monotonic()
    engine = InProcess(json.loads(args.engine_args), args.max_tokens)
    startup = time.monotonic() - started
    say(f"{args.name}: engine started in {startup:.1f} s")
    try:
        warm = await engine.send(0, 0)
        if not warm.ok:
            raise SystemExit(f"{args.name}: the warm-up request failed: {warm.error}")
        # This process is the client and the engine's front end; its children are the core.
        return startup, await run_levels(
            engine.send,
            parse_levels(args.levels),
            name=args.name,
            system_pids=lambda: [os.getpid()],
            say=say,
        )
    finally:
        engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_asyncllm")
    parser.add_argument("--engine-args", required=True, help="AsyncEngineArgs as JSON")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--levels", required=True, help="concurrency:requests,...")
    parser.add_argument("--name", default="asyncllm")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    startup, levels = asyncio.run(drive(args))
    with open(args.out, "w") as f:
        json.dump({"startup_s": startup, "levels": [level.to_json() for level in levels]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
