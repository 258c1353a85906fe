"""The bundled real model, as `make run` serves it: prepared offline, then asked a question."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import openai
from redis.asyncio import Redis

from shared.keys import Keys
from shared.settings import BUNDLED_MODEL, Settings
from tests.clients import answer_text, follow, ws_receive_until
from tests.conftest import report
from tests.servers import running_gateway, settings_env

ROOT = Path(__file__).resolve().parent.parent


def _prepare(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "prepare-model"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


async def _wait_announced(
    redis: Redis, keys: Keys, since: float, proc: subprocess.Popen[bytes]
) -> None:
    for _ in range(6000):  # the engine loads in about 30 s here; allow 10 minutes
        score = await redis.zscore(keys.models, BUNDLED_MODEL)
        if score is not None and score >= since:
            return
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        await asyncio.sleep(0.1)
    raise AssertionError("the SmolLM2 worker never announced its model")


async def _chat(http: aiohttp.ClientSession, base: str, turns: list[str]) -> list[str]:
    """Each turn on one new session, in order; the answers."""
    async with http.post(f"{base}/v1/sessions") as response:
        session = await response.json()
    answers = []
    async with http.ws_connect(session["ws_url"]) as ws:
        await follow(ws, session["session_id"])
        for turn in turns:
            message = {"role": "user", "content": turn}
            await ws.send_json(
                {"type": "prompt", "messages": [message], "temperature": 0, "max_tokens": 24}
            )
            events = await ws_receive_until(ws, timeout=120)
            assert events[-1]["type"] == "stream_end", events[-1]
            answers.append(answer_text(events))
    return answers


async def test_prepared_smollm2_answers_a_chat_prompt_through_the_stack(
    settings: Settings, redis: Redis, keys: Keys, tmp_path: Path
) -> None:
    real = settings.model_copy(
        update={
            "engine": "vllm",
            "model": BUNDLED_MODEL,
            "default_model": BUNDLED_MODEL,
            "model_cache_dir": str(tmp_path / "models"),
            "worker_slots": 8,
        }
    )
    env = settings_env(real)

    started = time.monotonic()
    prepared = _prepare(env)
    prepare_s = time.monotonic() - started
    assert prepared.returncode == 0, prepared.stderr
    folder = Path(prepared.stdout.strip())
    assert folder == tmp_path / "models" / BUNDLED_MODEL
    for name in ("config.json", "model.safetensors", "tokenizer.json", ".tokenbus-complete"):
        assert (folder / name).is_file(), name
    again = _prepare(env)  # once prepared, a second run converts nothing
    assert again.returncode == 0 and "model_prepared_already" in again.stderr

    since = time.time()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        t0 = time.monotonic()
        await _wait_announced(redis, keys, since, worker)
        engine_s = time.monotonic() - t0
        async with running_gateway(real) as base, aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/sessions") as response:
                session = await response.json()
            async with http.ws_connect(session["ws_url"]) as ws:
                await follow(ws, session["session_id"])
                await ws.send_json(
                    {
                        "type": "prompt",
                        "messages": [{"role": "user", "content": "What is the capital of France?"}],
                        "temperature": 0,
                        "max_tokens": 48,
                    }
                )
                events = await ws_receive_until(ws, timeout=120)
            remembered = await _chat(http, base, ["Hi! My name is Zorblax.", "What is my name?"])
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            # The question the WebSocket asked, greedily: the OpenAI route is the same job
            # path, so it must give the very same answer. (Another question's answer is the
            # model's business: "What is the capital of Italy?" went from "Rome" to "Il
            # Coriobella, Italy." with nothing of ours changed, when pip resolved newer
            # tokenizers/transformers on a fresh machine.)
            completion = await client.chat.completions.create(
                model=BUNDLED_MODEL,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                temperature=0,
                max_tokens=48,
            )
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    answer = answer_text(events)
    report(
        f"SmolLM2: prepared in {prepare_s:.1f} s, worker's engine ready in {engine_s:.1f} s; "
        f"'What is the capital of France?' -> {answer!r}"
    )
    assert code == 0, log_path.read_text()[-3000:]
    assert "Paris" in answer
    end = events[-1]
    assert end["type"] == "stream_end" and end["finish_reason"] == "stop"
    assert end["usage"]["prompt_tokens"] > 10 and end["usage"]["completion_tokens"] > 3
    # The session remembered the first turn: the name is only in the history.
    report(f"SmolLM2 with memory: 'What is my name?' -> {remembered[-1]!r}")
    assert "Zorblax" in remembered[-1]
    via_openai = completion.choices[0].message.content or ""
    report(f"SmolLM2 through the openai client: same question -> {via_openai!r}")
    assert via_openai == answer and completion.usage is not None
    assert completion.usage.completion_tokens == end["usage"]["completion_tokens"]


def test_worker_without_a_prepared_model_says_what_to_run(
    settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(
        settings.model_copy(
            update={"engine": "vllm", "model": BUNDLED_MODEL, "model_cache_dir": str(tmp_path)}
        )
    )
    env["TOKENBUS_LOG_LEVEL"] = "INFO"
    done = subprocess.run(
        [sys.executable, "-m", "workers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "engine_failed" in done.stderr and "tokenbus prepare-model" in done.stderr
