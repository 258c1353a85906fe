"""The synthetic engine on its own: deterministic answers, limits, continuation, abort."""

from __future__ import annotations

import time

import pytest

from shared.protocol import ChatMessage, Job, SamplingParams
from shared.settings import Settings
from workers.engine import Engine, EngineDelta, EngineError
from workers.engines import make_engine
from workers.synthetic import WORDS, SyntheticEngine, synthetic_text


def fast(**overrides: float) -> Settings:
    base: dict[str, float | str] = {
        "engine": "synthetic",
        "synthetic_ttft_ms": 1,
        "synthetic_tokens_per_s": 5000,
        "synthetic_tokens": 30,
    }
    base.update(overrides)
    return Settings.model_validate(base)


async def collect(engine: Engine, job: Job, prefix: str = "") -> list[EngineDelta]:
    return [d async for d in engine.generate(job, prefix=prefix)]


def test_text_is_deterministic_words_with_spaces() -> None:
    job = Job(id="job_a", session_id="s1", prompt="hello there")
    tokens = synthetic_text(job, 40)
    assert tokens == synthetic_text(job.model_copy(update={"created_at": 1.0}), 40)
    assert len(tokens) == 40
    assert tokens[0] in WORDS
    assert all(t.startswith(" ") and t[1:] in WORDS for t in tokens[1:])
    assert synthetic_text(job, 10) == tokens[:10]
    other = Job(id="job_b", session_id="s1", prompt="hello there")
    assert synthetic_text(other, 40) != tokens


def test_sampling_seed_makes_text_depend_on_prompt_only() -> None:
    seeded = SamplingParams(seed=7)
    a = Job(id="job_a", session_id="s", prompt="p", sampling=seeded)
    b = Job(id="job_b", session_id="s", prompt="p", sampling=seeded)
    c = Job(id="job_c", session_id="s", prompt="q", sampling=seeded)
    assert synthetic_text(a, 20) == synthetic_text(b, 20)
    assert synthetic_text(a, 20) != synthetic_text(c, 20)


async def test_generate_streams_the_whole_answer() -> None:
    settings = fast()
    engine = SyntheticEngine(settings)
    job = Job(id="job_g", session_id="s", prompt="one two  three\nfour")
    before = time.time()
    deltas = await collect(engine, job)
    after = time.time()
    assert "".join(d.text for d in deltas) == "".join(synthetic_text(job, 30))
    assert [d.tokens for d in deltas] == [1] * 30
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 30)
    assert last.usage.total_tokens == 34
    stamps = [d.t for d in deltas]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after


async def test_max_tokens_caps_with_length() -> None:
    engine = SyntheticEngine(fast())
    job = Job(id="job_m", session_id="s", prompt="x", max_tokens=5)
    deltas = await collect(engine, job)
    assert "".join(d.text for d in deltas) == "".join(synthetic_text(job, 5))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 5


async def test_default_max_tokens_applies_when_job_names_none() -> None:
    engine = SyntheticEngine(fast(default_max_tokens=3))
    deltas = await collect(engine, Job(id="job_d", session_id="s", prompt="x"))
    assert sum(d.tokens for d in deltas) == 3
    assert deltas[-1].finish_reason == "length"


async def test_prompt_tokens_count_all_messages() -> None:
    engine = SyntheticEngine(fast(synthetic_tokens=2))
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="what is a token"),
    ]
    deltas = await collect(engine, Job(id="job_c", session_id="s", messages=messages))
    usage = deltas[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (6, 2, 8)


@pytest.mark.parametrize("k", [1, 7, 29])
async def test_continuation_emits_only_the_remainder(k: int) -> None:
    engine = SyntheticEngine(fast())
    job = Job(id="job_k", session_id="s", prompt="continue me")
    tokens = synthetic_text(job, 30)
    prefix = "".join(tokens[:k])
    deltas = await collect(engine, job, prefix)
    assert [d.text for d in deltas] == tokens[k:]
    assert prefix + "".join(d.text for d in deltas) == "".join(tokens)
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 30


async def test_continuation_of_a_complete_answer_only_finishes() -> None:
    engine = SyntheticEngine(fast())
    job = Job(id="job_full", session_id="s", prompt="p")
    deltas = await collect(engine, job, "".join(synthetic_text(job, 30)))
    assert len(deltas) == 1
    assert (deltas[0].text, deltas[0].tokens, deltas[0].finish_reason) == ("", 0, "stop")


@pytest.mark.parametrize("cut", ["mid-token", "foreign"])
async def test_continuation_refuses_a_prefix_that_does_not_fit(cut: str) -> None:
    engine = SyntheticEngine(fast())
    job = Job(id="job_bad", session_id="s", prompt="p")
    full = "".join(synthetic_text(job, 30))
    prefix = full[: len(synthetic_text(job, 1)[0]) + 2] if cut == "mid-token" else "zzz qqq"
    with pytest.raises(EngineError) as caught:
        await collect(engine, job, prefix)
    assert caught.value.code == "bad_prefix"


async def test_abort_ends_the_generator_with_cancelled() -> None:
    engine = SyntheticEngine(fast(synthetic_tokens_per_s=20, synthetic_tokens=1000))
    job = Job(id="job_abort", session_id="s", prompt="p")
    deltas: list[EngineDelta] = []
    async for delta in engine.generate(job):
        deltas.append(delta)
        if len(deltas) == 2:
            await engine.abort(job.id)
    assert len(deltas) == 3
    last = deltas[-1]
    assert (last.text, last.tokens, last.finish_reason) == ("", 0, "cancelled")
    assert last.usage is not None and last.usage.completion_tokens == 2
    await engine.abort(job.id)  # no longer running: nothing happens


async def test_close_cancels_running_generators() -> None:
    engine = SyntheticEngine(fast(synthetic_tokens_per_s=20, synthetic_tokens=1000))
    job = Job(id="job_close", session_id="s", prompt="p")
    stream = engine.generate(job)
    first = await anext(stream)
    await engine.close()
    rest = [d async for d in stream]
    assert first.tokens == 1
    assert [d.finish_reason for d in rest] == ["cancelled"]


def test_make_engine_by_name() -> None:
    assert isinstance(make_engine(fast()), SyntheticEngine)
    with pytest.raises(ValueError, match="synthetic") as caught:
        make_engine(Settings(engine="vllm-nope"))
    assert "vllm-nope" in str(caught.value)
