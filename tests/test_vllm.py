"""The vllm engine for real, on the CPU: gateway -> Redis -> worker -> vLLM -> client.

Every test shares one engine (``tiny_engine``) on a tiny random model; each runs its own worker
on its own key prefix in front of it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from shared.codec import text as text_of
from shared.keys import Keys
from shared.protocol import ChatMessage, Job, SamplingParams
from shared.settings import Settings
from tests.clients import (
    answer_text,
    assert_contiguous,
    follow,
    read_sse_until,
    sse_events,
    ws_receive_until,
)
from tests.conftest import TINY_MODEL, report
from tests.dying_engine import DiesAfter
from tests.engine_thread import ThreadedEngine
from tests.servers import auth, new_session, post_job, running_gateway, running_worker, stack
from tests.tiny_model import CONTEXT
from workers.consumer import Worker

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
#: Far beyond what any step here takes, even on a loaded CI machine: only a hang reaches it.
STALL_S = 180


@pytest.fixture
def vsettings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"engine": "vllm", "model": TINY_MODEL, "default_model": TINY_MODEL}
    )


async def reference(engine: ThreadedEngine, job: Job, prefix: str = "") -> str:
    """The engine's answer to ``job`` asked directly, with no worker, Redis or gateway."""
    return "".join([d.text async for d in engine.generate(job, prefix=prefix)])


def greedy_job(max_tokens: int, stop: list[str] | None = None) -> Job:
    return Job(
        session_id="reference",
        model=TINY_MODEL,
        messages=[ChatMessage(role="user", content=QUESTION[0]["content"])],
        sampling=SamplingParams(temperature=0.0, stop=stop or []),
        max_tokens=max_tokens,
    )


async def wait_unfinished_zero(engine: ThreadedEngine) -> int:
    """vLLM's count of unfinished requests once it reaches 0 (or after 10 s)."""
    left = await engine.unfinished_requests()
    for _ in range(200):
        if left == 0:
            break
        await asyncio.sleep(0.05)
        left = await engine.unfinished_requests()
    return left


async def test_chat_answer_streams_through_the_stack_to_ws_and_sse(
    vsettings: Settings, tiny_engine: ThreadedEngine
) -> None:
    async with stack(vsettings, tiny_engine) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        sse = asyncio.create_task(read_sse_until(http, session["sse_url"], timeout=60))
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            await ws.send_json(
                {"type": "prompt", "messages": QUESTION, "temperature": 0, "max_tokens": 24}
            )
            ws_events = await ws_receive_until(ws, timeout=60)
        sse_events_ = [e.data for e in await sse]

    want = await reference(tiny_engine, greedy_job(24))
    assert want.strip()
    for events in (ws_events, sse_events_):
        session_events = [e for e in events if "offset" in e]
        assert session_events[0]["type"] == "stream_start"
        assert answer_text(events) == want
        assert_contiguous(events)
    end = sse_events_[-1]
    assert end["type"] == "stream_end" and end["finish_reason"] == "length"
    prompt_ids = tiny_engine.inner.render(greedy_job(24))
    assert end["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 24,
        "total_tokens": len(prompt_ids) + 24,
    }
    assert sum(e["tokens"] for e in sse_events_ if e["type"] == "delta") == 24


async def test_sixteen_concurrent_jobs_are_batched_and_all_complete(
    vsettings: Settings, tiny_engine: ThreadedEngine
) -> None:
    n, max_tokens = 16, 96
    async with stack(vsettings, tiny_engine) as (base, http):
        sessions = [await new_session(http, base) for _ in range(n)]
        readers = [
            asyncio.create_task(read_sse_until(http, s["sse_url"], timeout=120)) for s in sessions
        ]
        await asyncio.sleep(0.2)
        for i, session in enumerate(sessions):
            body = {"prompt": f"story number {i}", "seed": i, "max_tokens": max_tokens}
            await post_job(http, session, body)
        # Sampled while they run: more than one request inside vLLM at once is batching.
        most_at_once = 0
        while not all(r.done() for r in readers):
            most_at_once = max(most_at_once, await tiny_engine.unfinished_requests())
            await asyncio.sleep(0.01)
        results = [[e.data for e in await r] for r in readers]
    texts = set()
    for events in results:
        end = events[-1]
        assert end["type"] == "stream_end" and end["finish_reason"] == "length"
        assert end["usage"]["completion_tokens"] == max_tokens
        assert sum(e["tokens"] for e in events if e["type"] == "delta") == max_tokens
        assert_contiguous(events)
        texts.add(answer_text(events))
    assert len(texts) == n  # each job its own answer (own prompt and seed)
    assert most_at_once > 1
    report(f"vLLM, 16 concurrent jobs: up to {most_at_once} running in the engine at once")


async def test_cancel_by_ws_http_and_control_entry_aborts_and_frees_the_slot(
    vsettings: Settings, tiny_engine: ThreadedEngine, redis: Redis, keys: Keys
) -> None:
    # One slot: each next job runs only if the cancelled one gave its slot back.
    one_slot = vsettings.model_copy(update={"worker_slots": 1})
    long = {"prompt": "a long story", "max_tokens": CONTEXT - 32, "temperature": 0.9}
    async with stack(one_slot, tiny_engine) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            ended: list[dict[str, Any]] = []

            async def run_and_cancel(how: str) -> None:
                await ws.send_json({"type": "prompt", **long})
                job_id = (await ws_receive_until(ws, until_type="queued"))[-1]["job_id"]
                await ws_receive_until(ws, until_type="delta", count=3, timeout=60)
                assert await tiny_engine.unfinished_requests() == 1
                if how == "ws":
                    await ws.send_json({"type": "cancel", "job_id": job_id})
                elif how == "http":
                    url = f"{session['jobs_url']}/{job_id}"
                    async with http.delete(url, headers=auth(session)) as response:
                        assert response.status == 202
                else:  # what another service writes: a control entry, straight to Redis
                    await redis.xadd(keys.control, {"action": "cancel", "job_id": job_id})
                events = await ws_receive_until(ws, timeout=60)
                end = events[-1]
                assert end["job_id"] == job_id and end["finish_reason"] == "cancelled"
                assert end["usage"]["completion_tokens"] < long["max_tokens"]
                ended.append(end)
                assert await wait_unfinished_zero(tiny_engine) == 0

            for how in ("ws", "http", "control"):
                await run_and_cancel(how)
            # The slot is free: a last job runs to its end.
            await ws.send_json({"type": "prompt", "prompt": "after", "max_tokens": 8})
            last = (await ws_receive_until(ws, timeout=60))[-1]
        assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 8
        for end in ended:
            state = await redis.hget(keys.job(end["job_id"]), "state")
            assert state == b"cancelled"


async def test_job_cancelled_while_queued_never_runs(
    vsettings: Settings, tiny_engine: ThreadedEngine, redis: Redis, keys: Keys
) -> None:
    one_slot = vsettings.model_copy(update={"worker_slots": 1})
    async with stack(one_slot, tiny_engine) as (base, http):
        session = await new_session(http, base)
        reader = asyncio.create_task(read_sse_until(http, session["sse_url"], count=2))
        await asyncio.sleep(0.2)
        running = await post_job(http, session, {"prompt": "first", "max_tokens": CONTEXT - 32})
        queued = await post_job(http, session, {"prompt": "second", "max_tokens": 8})
        for job_id in (queued, running):
            async with http.delete(
                f"{session['jobs_url']}/{job_id}", headers=auth(session)
            ) as response:
                assert response.status == 202
        events = [e.data for e in await reader]
        assert await wait_unfinished_zero(tiny_engine) == 0
    ends = {e["job_id"]: e for e in events if e["type"] == "stream_end"}
    assert ends[queued]["finish_reason"] == "cancelled"
    assert ends[running]["finish_reason"] == "cancelled"
    # Never run: no stream_start, no deltas, no attempt counted, no worker named.
    assert not [e for e in events if e.get("job_id") == queued and e["type"] != "stream_end"]
    record = await redis.hgetall(keys.job(queued))
    assert record[b"state"] == b"cancelled"
    assert record.get(b"attempts", b"0") == b"0" and b"worker" not in record, record


async def test_bad_requests_get_error_events_and_the_worker_goes_on(
    vsettings: Settings, tiny_engine: ThreadedEngine, redis: Redis, keys: Keys
) -> None:
    async with stack(vsettings, tiny_engine) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        reader = asyncio.create_task(read_sse_until(http, session["sse_url"], timeout=60))
        await asyncio.sleep(0.2)
        too_long = " ".join(["capital"] * (CONTEXT + 50))
        long_job = await post_job(http, session, {"prompt": too_long})
        stream = keys.jobs_stream(TINY_MODEL)
        wrong_model = {"v": 1, "id": "job-wrong", "session_id": sid, "prompt": "x", "model": "nope"}
        await redis.xadd(stream, {"job": json.dumps(wrong_model)})
        empty_stop = {"v": 1, "id": "job-stop", "session_id": sid, "prompt": "x"}
        empty_stop["sampling"] = {"stop": [""]}  # vLLM refuses it: so does the schema
        await redis.xadd(stream, {"job": json.dumps(empty_stop)})
        async with http.post(
            session["jobs_url"], json={"prompt": "x", "stop": [""]}, headers=auth(session)
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "stop.0"
        good = await post_job(http, session, {"prompt": "still fine", "max_tokens": 6})
        events = [e.data for e in await reader]
    errors = {e["job_id"]: e for e in events if e["type"] == "error"}
    assert errors[long_job]["code"] == "context_length_exceeded"
    assert f"context of {CONTEXT} tokens" in errors[long_job]["message"]
    assert errors["job-wrong"]["code"] == "unknown_model"
    assert errors["job-stop"]["code"] == "invalid_job" and "stop" in errors["job-stop"]["message"]
    end = events[-1]
    assert end["type"] == "stream_end" and end["job_id"] == good
    assert end["usage"]["completion_tokens"] == 6
    assert await redis.hget(keys.job(long_job), "state") == b"failed"


async def test_stop_strings_end_the_answer_before_them(tiny_engine: ThreadedEngine) -> None:
    free = await reference(tiny_engine, greedy_job(40))
    # Stop at a piece of text the model is known to produce, a few words in.
    cut = len(free) // 2
    stop = free[cut : cut + 3]
    assert stop.strip()
    stopped = greedy_job(40, stop=[stop])
    deltas = [d async for d in tiny_engine.generate(stopped)]
    text = "".join(d.text for d in deltas)
    assert text == free[: free.index(stop)]
    assert deltas[-1].finish_reason == "stop"


async def test_interrupted_answer_continues_from_published_text_without_repeats(
    vsettings: Settings, tiny_engine: ThreadedEngine, redis: Redis, keys: Keys
) -> None:
    max_tokens = 400  # long enough that the engine dies mid-answer
    async with aiohttp.ClientSession() as http, running_gateway(vsettings) as base:
        session = await new_session(http, base)
        sid = session["session_id"]
        job = Job(
            id="job-continued",
            session_id=sid,
            model=TINY_MODEL,
            messages=[ChatMessage(role="user", content="Tell me a long story.")],
            sampling=SamplingParams(temperature=0.0),
            max_tokens=max_tokens,
        )
        entry: dict[Any, Any] = {"job": job.model_dump_json()}
        events: list[dict[str, Any]] = []
        async with http.get(session["sse_url"]) as response:
            stream = sse_events(response)
            # First worker: its engine dies after 5 deltas; the job stays unacknowledged.
            first = Worker(vsettings, engine=DiesAfter(tiny_engine, 5), drain_timeout_s=0.0)
            task = asyncio.create_task(first.run())
            await first.ready.wait()
            await redis.xadd(keys.jobs_stream(TINY_MODEL), entry)
            # Hang guards (STALL_S each phase): a stall fails at the phase it is in.
            async with asyncio.timeout(STALL_S):
                await task  # the worker stops by itself when its engine dies
            assert first.failure is not None
            assert await wait_unfinished_zero(tiny_engine) == 0
            published = text_of(await redis.get(keys.job_text(sid, job.id)) or b"")
            assert published

            # Second worker: the same job again, as the recovery will hand it over.
            async with running_worker(vsettings, tiny_engine), asyncio.timeout(STALL_S):
                await redis.xadd(keys.jobs_stream(TINY_MODEL), entry)
                async for event in stream:
                    events.append(event.data)
                    if event.data["type"] in ("stream_end", "error"):
                        break

    assert [e["type"] for e in events].count("stream_start") == 1
    end = events[-1]
    assert end["type"] == "stream_end", end
    text = answer_text(events)
    # One answer: the published part, then the rest. The second worker continued from the
    # published token ids (not the re-tokenized text), so the answer is the uninterrupted one.
    assert text.startswith(published) and len(text) > len(published)
    assert text == await reference(tiny_engine, job)
    assert_contiguous(events)
    assert end["usage"]["completion_tokens"] == max_tokens
    assert await redis.hget(keys.job(job.id), "attempts") == b"2"


def test_stream_interval_grows_with_the_jobs_running(settings: Settings) -> None:
    from workers.vllm_engine import VllmEngine

    engine = VllmEngine(settings.model_copy(update={"stream_interval_max": 16}))
    running = engine._requests  # job id -> request id: what the engine runs now
    assert engine.stream_interval() == 1  # a lone answer streams token by token
    running["a"] = "ra"
    assert engine.stream_interval() == 1
    running.update({f"j{i}": f"r{i}" for i in range(15)})
    assert engine.stream_interval() == 8  # 16 running
    running.update({f"k{i}": f"r{i}" for i in range(48)})
    assert engine.stream_interval() == 16  # 64 running: the cap
    off = VllmEngine(settings.model_copy(update={"stream_interval_max": 1}))
    off._requests.update(running)
    assert off.stream_interval() == 1


def test_a_stream_interval_below_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBUS_STREAM_INTERVAL_MAX", "0")
    with pytest.raises(ValidationError, match="stream_interval_max"):
        Settings()
