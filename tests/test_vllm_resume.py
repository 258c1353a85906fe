"""Exact continuation on the real vLLM engine (tiny model, CPU): an interrupted greedy answer,
continued by another worker from the published token ids, is the uninterrupted answer.

Worker A's engine "dies" after k deltas (tests.dying_engine.DiesAfter) and A stops, leaving
its entry pending and its lease to lapse; worker B reclaims the entry (XAUTOCLAIM) and
continues. Everything is read back from Redis: the history, the text and the packed ids.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.codec import text as text_of
from shared.jobs import get_record
from shared.keys import Keys, Lease
from shared.protocol import ChatMessage, Job, SamplingParams
from shared.settings import Settings
from tests.conftest import TINY_MODEL, report
from tests.dying_engine import DiesAfter
from tests.engine_thread import ThreadedEngine
from tests.servers import running_worker
from tests.test_lease import stored_ids
from tests.test_worker import deltas_of, history, job_events
from workers.consumer import Worker
from workers.engine import EngineError

#: Only a hang reaches it (every step here takes seconds).
STALL_S = 180
MAX_TOKENS = 40
CUTS = (1, 3, 7)  # deltas the first worker's engine gets out before it dies
QUESTION = "Tell me a long story."  # the tiny model's answer has split characters early on


@pytest.fixture
def vsettings(settings: Settings) -> Settings:
    # A short lease, so the second worker takes the job over within a second or so.
    return settings.model_copy(
        update={
            "engine": "vllm",
            "model": TINY_MODEL,
            "default_model": TINY_MODEL,
            "lease_ttl_s": 1.0,
            "reclaim_interval_s": 0.2,
        }
    )


def story(job_id: str, sampling: SamplingParams) -> Job:
    return Job(
        id=job_id,
        session_id=f"sess-{job_id}",
        model=TINY_MODEL,
        messages=[ChatMessage(role="user", content=QUESTION)],
        sampling=sampling,
        max_tokens=MAX_TOKENS,
    )


async def enqueue(redis: Redis, keys: Keys, job: Job) -> None:
    await redis.xadd(keys.jobs_stream(TINY_MODEL), {"job": job.model_dump_json()})


async def published(redis: Redis, keys: Keys, job: Job) -> tuple[str, list[int]]:
    """The job's answer text and token ids as Redis holds them."""
    text = text_of(await redis.get(keys.job_text(job.session_id, job.id)) or b"")
    ids = await stored_ids(redis, keys.job_token_ids(job.session_id, job.id))
    return text, ids


async def interrupted(
    settings: Settings, engine: ThreadedEngine, redis: Redis, keys: Keys, job: Job, cut: int
) -> tuple[str, list[int]]:
    """Run ``job`` on a worker whose engine dies after ``cut`` deltas; what it published."""
    first = Worker(
        settings.model_copy(update={"worker_id": f"va-{job.id}"}),
        engine=DiesAfter(engine, cut),
        drain_timeout_s=0.0,
    )
    task = asyncio.create_task(first.run())
    async with asyncio.timeout(STALL_S):
        await first.ready.wait()
        await enqueue(redis, keys, job)
        await task  # it stops by itself once its engine died
    assert first.failure is not None
    text, ids = await published(redis, keys, job)
    assert ids, "the first attempt published nothing"
    return text, ids


async def continued(
    settings: Settings, engine: ThreadedEngine, redis: Redis, keys: Keys, job: Job
) -> list[dict[str, Any]]:
    """Let another worker take ``job`` over (its lease lapses first); the session's events."""
    second = settings.model_copy(update={"worker_id": f"vb-{job.id}"})
    async with running_worker(second, engine), asyncio.timeout(STALL_S):
        return await job_events(redis, keys, job.session_id, job.id)


def mid_character_positions(engine: ThreadedEngine, ids: list[int]) -> list[int]:
    """Token counts n (0 < n < len(ids)) after which ``ids[:n]`` ends inside a character."""
    tokenizer = engine.inner.llm.get_tokenizer()
    return [
        n
        for n in range(1, len(ids))
        if str(tokenizer.decode(ids[:n], skip_special_tokens=True)).endswith("\ufffd")
    ]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


async def test_greedy_answer_continued_from_ids_is_the_uninterrupted_one(
    vsettings: Settings, tiny_engine: ThreadedEngine, redis: Redis, keys: Keys
) -> None:
    greedy = SamplingParams(temperature=0.0)
    # The uninterrupted answer, through a worker and Redis like the others.
    whole = story("job-whole", greedy)
    async with running_worker(vsettings, tiny_engine), asyncio.timeout(STALL_S):
        await enqueue(redis, keys, whole)
        await job_events(redis, keys, whole.session_id, whole.id)
    want_text, want_ids = await published(redis, keys, whole)
    assert len(want_ids) == MAX_TOKENS and want_text.strip()
    # Also right where the token stream is inside a character (a byte-level token that only
    # the next one completes): the engine's delta boundaries must not fall there.
    inside = mid_character_positions(tiny_engine, want_ids)
    assert inside, "the reference answer has no multi-token character to cut at"

    for cut in (*CUTS, inside[0]):
        job = story(f"job-cut-{cut}", greedy)
        prefix_text, prefix_ids = await interrupted(vsettings, tiny_engine, redis, keys, job, cut)
        assert len(prefix_ids) < MAX_TOKENS
        events = await continued(vsettings, tiny_engine, redis, keys, job)
        text, ids = await published(redis, keys, job)

        # What must hold whatever the kernels do: the published ids stand, and the second
        # attempt added to them, nothing repeated or dropped; the text follows the ids.
        assert ids[: len(prefix_ids)] == prefix_ids
        assert len(ids) == MAX_TOKENS
        assert text.startswith(prefix_text)
        deltas = deltas_of(events)
        assert "".join(d["delta"] for d in deltas) == text
        assert sum(d["tokens"] for d in deltas) == MAX_TOKENS
        types = [e["type"] for e in events]
        assert types.count("stream_start") == 1 and types[-1] == "stream_end"
        assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
        assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
        assert (await get_record(redis, keys, job.id))["attempts"] == "2"
        # The ids were handed over (same engine and model), not given up for the text.
        space = await redis.hget(keys.job_lease(job.session_id, job.id), Lease.SPACE)
        assert space is not None and text_of(space) == tiny_engine.token_space

        # And the point of keeping ids: the answer is the uninterrupted one, token for token.
        where = first_difference(ids, want_ids)
        if where is not None:
            report(
                f"greedy continuation after {len(prefix_ids)} tokens differs from the "
                f"uninterrupted answer at token {where}: {ids[where : where + 3]} against "
                f"{want_ids[where : where + 3]}"
            )
        assert where is None, f"cut after {cut} deltas: first differing token at {where}"
        assert text == want_text
    report(f"vLLM greedy continuation from ids: exact at cuts {(*CUTS, inside[0])} (deltas)")


async def test_seeded_sampled_answer_is_not_resumable_and_never_mixed(
    vsettings: Settings, tiny_engine: ThreadedEngine, redis: Redis, keys: Keys
) -> None:
    job = story("job-seeded", SamplingParams(temperature=0.8, seed=7))
    prefix_text, prefix_ids = await interrupted(vsettings, tiny_engine, redis, keys, job, 3)
    before = await history(redis, keys, job.session_id)

    events = await continued(vsettings, tiny_engine, redis, keys, job)
    # The answer ends with a clear error, nothing added to what the first attempt said.
    assert events[: len(before)] == before
    assert [(e["type"], e.get("code")) for e in events[len(before) :]] == [
        ("error", "not_resumable")
    ]
    assert events[-1]["job_id"] == job.id
    assert await published(redis, keys, job) == (prefix_text, prefix_ids)
    record = await get_record(redis, keys, job.id)
    assert (record["state"], record["finish"]) == ("failed", "not_resumable")


async def test_deltas_end_on_whole_characters_and_a_split_one_is_refused(
    tiny_engine: ThreadedEngine,
) -> None:
    job = story("job-split", SamplingParams(temperature=0.0))
    deltas = [d async for d in tiny_engine.generate(job)]
    ids = [i for d in deltas for i in d.token_ids]
    assert len(ids) == MAX_TOKENS
    inside = set(mid_character_positions(tiny_engine, ids))
    assert inside  # the answer does split characters across tokens
    # vLLM primes its detokenizer with the prompt: a continuation whose published ids ended
    # inside a character would start with the whole prompt's text. So no delta ends there.
    ends = [sum(len(d.token_ids) for d in deltas[: i + 1]) for i in range(len(deltas))]
    assert not inside & set(ends)
    # Ids that end inside a character (not written by this engine) fail clearly.
    cut = min(inside)
    with pytest.raises(EngineError) as refused:
        async for _ in tiny_engine.generate(job, prefix="", prefix_ids=ids[:cut]):
            pass
    assert refused.value.code == "not_resumable"
