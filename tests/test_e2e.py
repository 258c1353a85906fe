"""The whole pipeline on a real Redis and real sockets: intake -> worker -> channel -> gateway."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.protocol import Job
from shared.settings import Settings
from tests.clients import (
    answer_text,
    assert_contiguous,
    follow,
    read_sse_until,
    sse_events,
    ws_receive_until,
)
from tests.conftest import report
from tests.servers import auth, gateway_process, new_session, post_job, stack
from workers.synthetic import synthetic_text


def expected(job_id: str, session_id: str, prompt: str, n: int) -> str:
    job = Job(id=job_id, session_id=session_id, prompt=prompt)
    return "".join(synthetic_text(job, n))


async def test_job_xadded_as_json_streams_to_sse_and_ws(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            sse = asyncio.create_task(read_sse_until(http, session["sse_url"]))
            await asyncio.sleep(0.2)
            # Exactly what another service would write with any Redis client.
            entry = {"v": 1, "id": "job-json-1", "session_id": sid, "prompt": "Hello there"}
            await redis.xadd(keys.jobs_stream("synthetic"), {"job": json.dumps(entry)})
            ws_events = await ws_receive_until(ws)
            sse_events_ = [e.data for e in await sse]
        want = expected("job-json-1", sid, "Hello there", settings.synthetic_tokens)
        for events in (ws_events, sse_events_):
            assert [events[0]["type"], events[-1]["type"]] == ["stream_start", "stream_end"]
            assert answer_text(events) == want
            assert_contiguous(events)
            assert events[-1]["finish_reason"] == "stop"
            assert events[-1]["usage"]["completion_tokens"] == settings.synthetic_tokens


async def test_200_concurrent_sessions_each_get_every_delta_once(
    settings: Settings, redis: Redis
) -> None:
    n_sessions, n_tokens = 200, 40
    settings = settings.model_copy(
        update={
            "worker_slots": 256,
            "synthetic_tokens": n_tokens,
            "synthetic_tokens_per_s": 200.0,
            "synthetic_ttft_ms": 20.0,
            "batch_window_ms": 10.0,
        }
    )
    async with stack(settings) as (base, http):
        sessions = [await new_session(http, base) for _ in range(n_sessions)]

        async def one(i: int, session: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
            sid = session["session_id"]
            prompt = f"prompt {i}"
            if i % 2:
                async with http.ws_connect(session["ws_url"]) as ws:
                    await follow(ws, sid)
                    await ws.send_json({"type": "prompt", "prompt": prompt, "ref": i})
                    queued = await ws.receive_json()
                    assert queued["type"] == "queued" and queued["ref"] == i
                    events = await ws_receive_until(ws, timeout=120)
                    job_id = queued["job_id"]
            else:
                reader = asyncio.create_task(read_sse_until(http, session["sse_url"], timeout=120))
                job_id = await post_job(http, session, {"prompt": prompt})
                events = [e.data for e in await reader]
            return expected(job_id, sid, prompt, n_tokens), events

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
        elapsed = time.perf_counter() - started
    deltas = 0
    for want, events in results:
        assert answer_text(events) == want
        assert_contiguous(events)
        assert events[-1]["type"] == "stream_end"
        deltas += sum(1 for e in events if e["type"] == "delta")
    report(
        f"200 sessions x {n_tokens} tokens (synthetic): {elapsed:.2f} s wall, "
        f"{n_sessions * n_tokens / elapsed:.0f} tokens/s delivered, {deltas} delta events"
    )


async def _start_slow_job(http: aiohttp.ClientSession, session: dict[str, Any], prompt: str) -> str:
    return await post_job(http, session, {"prompt": prompt})


@pytest.fixture
def slow(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"synthetic_tokens": 60, "synthetic_tokens_per_s": 60.0, "batch_window_ms": 0.0}
    )


async def test_sse_client_drops_and_resumes_on_another_gateway_process(
    slow: Settings,
) -> None:
    async with stack(slow) as (base, http), gateway_process(slow) as other:
        session = await new_session(http, base)
        sid = session["session_id"]
        first: list[dict[str, Any]] = []
        last_id = None
        async with http.get(session["sse_url"]) as response:
            job_id = await post_job(http, session, {"prompt": "resume me"})
            async for event in sse_events(response):
                first.append(event.data)
                last_id = event.id
                if sum(e["type"] == "delta" for e in first) == 10:
                    break  # the client drops mid-stream
        assert last_id is not None
        resumed_url = session["sse_url"].replace(base, other)
        rest = await read_sse_until(http, resumed_url, headers={"Last-Event-ID": last_id})
        events = first + [e.data for e in rest]
        assert rest[0].data["offset"] == first[-1]["offset"] + 1
        assert answer_text(events) == expected(job_id, sid, "resume me", 60)
        assert_contiguous(events)


async def test_ws_client_drops_and_resumes_on_another_gateway_process(
    slow: Settings,
) -> None:
    async with stack(slow) as (base, http), gateway_process(slow) as other:
        session = await new_session(http, base)
        sid = session["session_id"]
        first: list[dict[str, Any]] = []
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            await ws.send_json({"type": "prompt", "prompt": "resume me"})
            job_id = (await ws.receive_json())["job_id"]
            while sum(e.get("type") == "delta" for e in first) < 10:
                first.append(await ws.receive_json())
        last = first[-1]
        url = f"{other.replace('http', 'ws')}/v1/ws"
        async with http.ws_connect(url) as ws:
            await ws.send_json(
                {
                    "session_id": sid,
                    "connect": True,
                    "token": session["token"],
                    "offset": last["offset"],
                    "epoch": last["epoch"],
                }
            )
            assert (await ws.receive_json())["type"] == "connected"
            rest = await ws_receive_until(ws)
        assert rest[0]["offset"] == last["offset"] + 1
        events = first + rest
        assert answer_text(events) == expected(job_id, sid, "resume me", 60)
        assert_contiguous(events)


async def test_subscriber_after_job_finished_gets_whole_answer(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        job_id = await post_job(http, session, {"prompt": "early bird"})
        for _ in range(200):
            if await redis.hget(keys.job(job_id), "state") == b"done":
                break
            await asyncio.sleep(0.05)
        assert await redis.hget(keys.job(job_id), "state") == b"done"
        events = [e.data for e in await read_sse_until(http, session["sse_url"])]
        sid = session["session_id"]
        assert answer_text(events) == expected(job_id, sid, "early bird", settings.synthetic_tokens)
        assert_contiguous(events)


async def test_bad_stream_entry_is_dead_lettered_and_next_job_runs(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        stream = keys.jobs_stream("synthetic")
        reader = asyncio.create_task(read_sse_until(http, session["sse_url"]))
        await asyncio.sleep(0.2)
        bad = {"v": 1, "id": "job-bad", "session_id": sid, "prompt": "x", "max_tokens": -5}
        await redis.xadd(stream, {"job": json.dumps(bad)})
        await redis.xadd(stream, {"job": b"\xff\xfe not a job"})
        good = {"v": 1, "id": "job-good", "session_id": sid, "prompt": "still here"}
        await redis.xadd(stream, {"job": json.dumps(good)})
        events = [e.data for e in await reader]
        dead = await redis.xrange(keys.dead_letter)
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["job_id"], e["code"]) for e in errors] == [("job-bad", "invalid_job")]
    assert "max_tokens" in errors[0]["message"]
    assert answer_text(events, "job-good") == expected(
        "job-good", sid, "still here", settings.synthetic_tokens
    )
    assert dead is not None and len(dead) == 2
    assert {(f or {}).get(b"code") for _, f in dead} == {b"invalid_job", b"bad_encoding"}


async def test_cancel_over_ws_and_http_stops_the_job(
    slow: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(slow) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            await ws.send_json({"type": "prompt", "prompt": "stop me"})
            job_id = (await ws.receive_json())["job_id"]
            events = await ws_receive_until(ws, until_type="delta", count=3)
            await ws.send_json({"type": "cancel", "job_id": job_id})
            events += await ws_receive_until(ws)
        assert {"type": "cancelling", "job_id": job_id} in events
        assert events[-1]["finish_reason"] == "cancelled"
        assert sum(e["type"] == "delta" for e in events) < 60

        job2 = await post_job(http, session, {"prompt": "stop me too"})
        reader = asyncio.create_task(read_sse_until(http, session["sse_url"], count=2))
        await asyncio.sleep(0.3)
        headers = auth(session)
        async with http.delete(f"{session['jobs_url']}/{job2}", headers=headers) as response:
            assert response.status == 202
        sse = [e.data for e in await reader]
        ends = [e for e in sse if e["type"] == "stream_end"]
        assert ends[-1]["job_id"] == job2 and ends[-1]["finish_reason"] == "cancelled"
        async with http.get(f"{session['jobs_url']}/{job2}", headers=headers) as response:
            assert (await response.json())["state"] == "cancelled"


async def test_disconnect_cancels_only_jobs_that_ask_for_it(
    slow: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(slow) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        jobs: dict[str, str] = {}
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            for policy in ("cancel", "continue"):
                await ws.send_json({"type": "prompt", "prompt": policy, "on_disconnect": policy})
                # Events of the first job may arrive before the second one's receipt.
                queued = (await ws_receive_until(ws, until_type="queued"))[-1]
                jobs[policy] = queued["job_id"]
            await ws_receive_until(ws, until_type="delta", count=2)
        states: dict[str, bytes | str | None] = {}
        for _ in range(200):
            states = {p: await redis.hget(keys.job(j), "state") for p, j in jobs.items()}
            if states["cancel"] == b"cancelled" and states["continue"] == b"done":
                break
            await asyncio.sleep(0.05)
        assert states == {"cancel": b"cancelled", "continue": b"done"}


async def test_overload_gets_429_and_dead_model_gets_503(
    slow: Settings, redis: Redis, keys: Keys
) -> None:
    settings = slow.model_copy(update={"worker_slots": 1, "max_queue_depth": 2})
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        headers = auth(session)
        statuses = []
        for _ in range(6):
            async with http.post(
                session["jobs_url"], json={"prompt": "x"}, headers=headers
            ) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert (await response.json())["error"]["code"] == "overloaded"
        assert statuses[:3] == [202, 202, 202]  # one running, two waiting
        assert statuses[-1] == 429
        await redis.zadd(keys.models, {"ghost": time.time() - 3600})
        async with http.post(
            session["jobs_url"], json={"prompt": "x", "model": "ghost"}, headers=headers
        ) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "no_worker"
