"""The OpenAI streaming client of the engine scenario, run as a process of its own.

``python -m bench.engine_client --base-url http://127.0.0.1:PORT/v1 ...`` drives one system
(tokenbus's gateway or vLLM's server, the same code for both) with the official ``openai``
package: ``AsyncOpenAI``, ``stream=True``, ``stream_options={"include_usage": True}``. One
warm-up answer, then every level; the levels go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import openai

from bench.engine_workload import Clock, Level, Record, prompt, run_levels


def parse_levels(text: str) -> list[tuple[int, int]]:
    """``"1:8,16:32"`` -> [(1, 8), (16, 32)]: concurrency and requests of each level."""
    out = []
    for part in text.split(","):
        concurrency, requests = part.split(":")
        out.append((int(concurrency), int(requests)))
    return out


def format_levels(levels: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{c}:{n}" for c, n in levels)


class Driver:
    def __init__(self, base_url: str, model: str, max_tokens: int) -> None:
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key="unused", max_retries=0, timeout=600.0
        )
        self.model = model
        self.max_tokens = max_tokens

    async def send(self, level: int, index: int) -> Record:
        clock = Clock()
        tokens = prompt_tokens = 0
        try:
            stream = await self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt(level, index)}],
                max_tokens=self.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                    prompt_tokens = chunk.usage.prompt_tokens
                for choice in chunk.choices:
                    clock.text(choice.delta.content or "")
        except Exception as exc:  # any failure is the record's, the run goes on
            return clock.done(tokens, f"{type(exc).__name__}: {exc}"[:300], prompt_tokens)
        if tokens == 0:
            return clock.done(0, "no usage chunk (or an empty answer)")
        return clock.done(tokens, prompt_tokens=prompt_tokens)


async def drive(args: argparse.Namespace) -> list[Level]:
    driver = Driver(args.base_url, args.model, args.max_tokens)
    try:
        warm = await driver.send(0, 0)
        if not warm.ok:
            raise SystemExit(f"{args.name}: the warm-up request failed: {warm.error}")
        pids = [int(p) for p in args.system_pids.split(",") if p]
        return await run_levels(
            driver.send,
            parse_levels(args.levels),
            name=args.name,
            system_pids=lambda: pids,
            say=say,
        )
    finally:
        await driver.client.close()


def say(line: str) -> None:
    """A progress line, on stderr (the AsyncLLM driver's stdout is vLLM's log)."""
    print(f"tokenbus bench: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_client")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--levels", required=True, help="concurrency:requests,...")
    parser.add_argument("--system-pids", default="", help="pids whose CPU time is measured")
    parser.add_argument("--name", default="client")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    levels = asyncio.run(drive(args))
    startup = None  # the system was started, and timed, by whoever runs this client
    with open(args.out, "w") as f:
        json.dump({"startup_s": startup, "levels": [level.to_json() for level in levels]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
