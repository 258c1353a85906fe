"""Idempotent intake: a client that retries a job request (HTTP or WebSocket) gets one job.

Real gateways on real sockets, a real worker (synthetic engine) and a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import aiohttp
from redis.asyncio import Redis

from shared.jobs import claim_idempotency_key, named_job
from shared.keys import Keys
from shared.settings import Settings
from shared.stream.position import HISTORY_FIELD
from tests.clients import answer_text, follow, read_sse_until, ws_receive_until
from tests.servers import (
    auth,
    gateway_process,
    new_session,
    running_gateway,
    running_worker,
    stack,
)

BODY: dict[str, Any] = {"prompt": "Tell me once", "max_tokens": 8}


async def post(
    http: aiohttp.ClientSession,
    session: dict[str, Any],
    body: dict[str, Any],
    key: str | None = None,
    *,
    url: str | None = None,
) -> tuple[int, dict[str, Any], str | None]:
    """POST a job (to ``url``, another gateway's jobs URL, when given): status, body, and the
    Idempotent-Replayed header."""
    headers = auth(session)
    if key is not None:
        headers["Idempotency-Key"] = key
    async with http.post(url or session["jobs_url"], json=body, headers=headers) as response:
        reply: dict[str, Any] = await response.json()
        return response.status, reply, response.headers.get("Idempotent-Replayed")


async def history(redis: Redis, keys: Keys, session_id: str) -> list[dict[str, Any]]:
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.session_history(session_id))
    )
    return [json.loads(fields[HISTORY_FIELD.encode()]) for _, fields in entries]


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def test_a_repeated_post_gets_the_same_job_and_one_answer(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        reader = asyncio.create_task(read_sse_until(http, session["sse_url"]))
        await asyncio.sleep(0.2)
        first = await post(http, session, BODY, "retry-1")
        second = await post(http, session, BODY, "retry-1")
        events = [e.data for e in await reader]
        # The body field says the same as the header.
        third = await post(http, session, {**BODY, "idempotency_key": "retry-1"})
        both = await post(http, session, {**BODY, "idempotency_key": "retry-1"}, "retry-1")

        status, reply, replayed = first
        job_id = reply["job_id"]
        assert (status, replayed, reply["state"]) == (202, None, "queued")
        assert "replayed" not in reply
        for status, reply, replayed in (second, third, both):
            assert (status, replayed) == (200, "true")
            assert reply["job_id"] == job_id and reply["replayed"] is True
            assert reply["session_id"] == sid and reply["model"] == "synthetic"
        assert third[1]["state"] == "done"  # a replay reports the job's state now

        assert await redis.xlen(keys.jobs_stream("synthetic")) == 1
        assert [e["job_id"] for e in of_type(events, "stream_start")] == [job_id]
        assert len(answer_text(events)) > 0
        await asyncio.sleep(0.3)  # nothing else comes on the session
        stored = await history(redis, keys, sid)
        assert len(of_type(stored, "stream_start")) == len(of_type(stored, "stream_end")) == 1
        record = await redis.hgetall(keys.job(job_id))
        assert record[b"state"] == b"done" and b"duplicates" not in record
        ttl = await redis.ttl(keys.session_idempotency(sid, "retry-1"))
        assert 0 < ttl <= settings.idempotency_ttl_s
        assert await redis.get(keys.session_idempotency(sid, "retry-1")) == job_id.encode()


async def test_ten_racing_posts_on_two_gateway_processes_make_one_job(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with (
        running_worker(settings),
        gateway_process(settings) as base_a,
        gateway_process(settings) as base_b,
        aiohttp.ClientSession() as http,
    ):
        session = await new_session(http, base_a)
        sid = session["session_id"]
        url_b = f"{base_b}/v1/sessions/{sid}/jobs"
        reader = asyncio.create_task(read_sse_until(http, session["sse_url"]))

        async def healthz(base: str) -> None:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200

        # Open the connections first, so the ten requests reach the gateways together.
        await asyncio.gather(*(healthz(b) for b in (base_a, base_b) for _ in range(5)))
        await asyncio.sleep(0.2)
        results = await asyncio.gather(
            *(post(http, session, BODY, "race", url=url_b if i % 2 else None) for i in range(10))
        )
        events = [e.data for e in await reader]
        await asyncio.sleep(0.3)
        stored = await history(redis, keys, sid)

    job_ids = {reply["job_id"] for _, reply, _ in results}
    assert len(job_ids) == 1, results
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 9 + [202], results
    assert sum(1 for _, _, replayed in results if replayed == "true") == 9
    assert await redis.xlen(keys.jobs_stream("synthetic")) == 1
    (job_id,) = job_ids
    assert [e["job_id"] for e in of_type(events, "stream_start")] == [job_id]
    assert [e["job_id"] for e in of_type(stored, "stream_start")] == [job_id]
    assert [e["job_id"] for e in of_type(stored, "stream_end")] == [job_id]


async def test_the_same_key_with_another_body_is_a_conflict(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        status, reply, _ = await post(http, session, BODY, "k")
        assert status == 202
        job_id = reply["job_id"]
        for other in ({**BODY, "prompt": "Something else"}, {**BODY, "temperature": 0}):
            status, reply, _ = await post(http, session, other, "k")
            assert status == 409, reply
            error = reply["error"]
            assert (error["code"], error["param"]) == ("idempotency_conflict", "Idempotency-Key")
            status, reply, _ = await post(http, session, {**other, "idempotency_key": "k"})
            assert status == 409
            assert reply["error"]["param"] == "idempotency_key"
        # A request that means the same (a lone stop string is a list of one) is a repeat.
        same = await post(http, session, {**BODY, "stop": "x"}, "s")
        again = await post(http, session, {**BODY, "stop": ["x"]}, "s")
        assert (same[0], again[0]) == (202, 200)
        assert same[1]["job_id"] == again[1]["job_id"] != job_id
        assert await redis.xlen(keys.jobs_stream("synthetic")) == 2


async def test_keys_of_different_sessions_never_meet(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        one, two = await new_session(http, base), await new_session(http, base)
        readers = [asyncio.create_task(read_sse_until(http, s["sse_url"])) for s in (one, two)]
        await asyncio.sleep(0.2)
        first = await post(http, one, BODY, "shared-key")
        second = await post(http, two, BODY, "shared-key")
        answers = [[e.data for e in await r] for r in readers]
    assert (first[0], second[0]) == (202, 202)
    assert first[1]["job_id"] != second[1]["job_id"]
    for session, reply, events in zip((one, two), (first[1], second[1]), answers, strict=True):
        assert reply["session_id"] == session["session_id"]
        assert [e["job_id"] for e in of_type(events, "stream_start")] == [reply["job_id"]]
    assert await redis.xlen(keys.jobs_stream("synthetic")) == 2


async def test_a_repeated_ws_prompt_gets_the_same_job(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        prompt = {"type": "prompt", **BODY, "idempotency_key": "ws-1"}
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            await ws.send_json({**prompt, "ref": 1})
            await ws.send_json({**prompt, "ref": 2})
            events = await ws_receive_until(ws)
            await ws.send_json({**prompt, "prompt": "another one", "ref": 3})
            conflict = (await ws_receive_until(ws, until_type="error"))[-1]
        # Over HTTP, the same request with the same key is the same job too.
        over_http = await post(http, session, BODY, "ws-1")
    queued = of_type(events, "queued")
    assert [q["ref"] for q in queued] == [1, 2]
    job_id = queued[0]["job_id"]
    assert queued[0].get("replayed") is None
    assert queued[1]["job_id"] == job_id and queued[1]["replayed"] is True
    assert [e["job_id"] for e in of_type(events, "stream_start")] == [job_id]
    assert (conflict["code"], conflict["ref"]) == ("idempotency_conflict", 3)
    assert (over_http[0], over_http[1]["job_id"]) == (200, job_id)
    assert await redis.xlen(keys.jobs_stream("synthetic")) == 1


async def test_bad_keys_get_400_naming_the_field(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        for key, body, param in (
            ("", BODY, "Idempotency-Key"),
            ("k" * 201, BODY, "Idempotency-Key"),
            (None, {**BODY, "idempotency_key": ""}, "idempotency_key"),
            (None, {**BODY, "idempotency_key": "a\u0001b"}, "idempotency_key"),
            (None, {**BODY, "idempotency_key": "line\nbreak"}, "idempotency_key"),
            ("one", {**BODY, "idempotency_key": "two"}, "idempotency_key"),
        ):
            status, reply, _ = await post(http, session, body, key)
            assert status == 400, (key, body, reply)
            assert reply["error"]["param"] == param
            assert param in reply["error"]["message"]
        status, _, _ = await post(http, session, BODY, "k" * 200)
        assert status == 202
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, session["session_id"])
            await ws.send_json({"type": "prompt", **BODY, "idempotency_key": ""})
            error = (await ws_receive_until(ws, until_type="error"))[-1]
            assert error["type"] == "error" and error["code"] == "invalid_request"
            assert "idempotency_key" in error["message"]


async def test_a_lost_key_still_finds_its_job_and_a_reused_one_makes_a_new_job(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    """The job id derives from session, key and request: when the key is gone (expired, or
    lost in a failover) but the job is still known, a repeat finds that job, not a new one."""
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        sid = session["session_id"]
        status, reply, _ = await post(http, session, BODY, "old")
        assert status == 202
        job_id = reply["job_id"]
        await redis.delete(keys.session_idempotency(sid, "old"))
        status, reply, replayed = await post(http, session, BODY, "old")
        assert (status, reply["job_id"], replayed) == (200, job_id, "true")
        assert await redis.get(keys.session_idempotency(sid, "old")) == job_id.encode()
        # Once the key expired, it may name another request.
        await redis.delete(keys.session_idempotency(sid, "old"))
        status, reply, _ = await post(http, session, {**BODY, "prompt": "new"}, "old")
        assert status == 202 and reply["job_id"] != job_id
        assert await redis.xlen(keys.jobs_stream("synthetic")) == 2


async def test_a_repeat_is_answered_even_when_the_queue_is_full(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    """No worker reads the queue: the first request fills it; its repeat still gets its job."""
    settings = settings.model_copy(update={"max_queue_depth": 1, "heartbeat_s": 60.0})
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        await redis.zadd(keys.models, {"synthetic": time.time()})
        session = await new_session(http, base)
        first = await post(http, session, BODY, "full")
        repeat = await post(http, session, BODY, "full")
        other = await post(http, session, BODY, "another")
    assert first[0] == 202
    assert (repeat[0], repeat[1]["job_id"], repeat[1]["state"]) == (
        200,
        first[1]["job_id"],
        "queued",
    )
    assert (other[0], other[1]["error"]["code"]) == (429, "overloaded")
    # A refused request leaves its key free: a retry once there is room enqueues it.
    assert await redis.get(keys.session_idempotency(session["session_id"], "another")) is None
    assert await redis.xlen(keys.jobs_stream("synthetic")) == 1


async def test_one_of_many_racing_claims_wins(redis: Redis, keys: Keys) -> None:
    """The one Redis operation that decides: 50 claims at once, each naming its own job."""
    claims = await asyncio.gather(
        *(
            claim_idempotency_key(redis, keys, "s_race", "k", f"job_{i}", ttl_s=60)
            for i in range(50)
        )
    )
    winners = [i for i, earlier in enumerate(claims) if earlier is None]
    assert len(winners) == 1
    assert set(claims) == {None, f"job_{winners[0]}"}
    assert await named_job(redis, keys, "s_race", "k") == f"job_{winners[0]}"
    assert await named_job(redis, keys, "s_other", "k") is None
