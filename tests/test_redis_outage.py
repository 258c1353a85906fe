"""A gateway rides out a Redis restart: SIGKILL mid-stream, then back, loading its AOF.

A redis-server of the test's own (never the shared one) with ``appendfsync always``, a gateway
as a real process, an SSE and a WebSocket client on one session, and a publisher that is the
publish script itself (no worker). Both clients must end with every event once, in order and
with contiguous offsets; the gateway must say it is not ready and answer 503 while Redis is
away, and never crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.close_codes import CLOSE_UNAVAILABLE
from shared.embedded_redis import free_port
from shared.keys import Keys
from shared.protocol import Delta, StreamEnd, StreamStart
from shared.redis_client import connect
from shared.settings import Settings
from shared.stream.publish import SessionPublisher
from tests.clients import answer_text, assert_contiguous, follow, sse_events
from tests.restartable_redis import restartable_redis
from tests.servers import settings_env, wait_ready

WAIT_S = 60.0  # a failsafe for a hung test, never a speed requirement
#: Keys that make the AOF long enough that a restart spends a while loading it (LOADING).
FILLER_KEYS = 3000


@contextlib.asynccontextmanager
async def gateway_process(settings: Settings, log: Path) -> AsyncIterator[tuple[str, Any]]:
    port = free_port()
    env = settings_env(settings) | {"TOKENBUS_PORT": str(port)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stderr=out)
        try:
            await wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
            yield f"http://127.0.0.1:{port}", proc
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 15)


async def _status(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> int:
    async with http.request(method, url, **kw) as response:
        if response.status == 503 and "/readyz" not in url:
            assert (await response.json())["error"]["code"] == "redis_unavailable"
        return response.status


async def _until_status(http: aiohttp.ClientSession, url: str, status: int) -> None:
    async with asyncio.timeout(WAIT_S):
        while True:
            if await _status(http, "GET", url) == status:
                return
            await asyncio.sleep(0.1)


async def _publish(pub: SessionPublisher, sid: str, events: list[Any]) -> None:
    """One event per script call, as a worker's batches would be."""
    for event in events:
        await pub.publish(sid, [event])


async def _ws_follow(
    ws: aiohttp.ClientWebSocketResponse, got: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT_S):
        while not got or got[-1].get("type") != "stream_end":
            got.append(await ws.receive_json())
    return got


async def _sse_follow(
    http: aiohttp.ClientSession, url: str, got: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT_S), http.get(url) as response:
        assert response.status == 200
        async for event in sse_events(response):
            got.append(event.data)
            if event.data.get("type") == "stream_end":
                break
    return got


async def _wait_for_offset(got: list[dict[str, Any]], offset: int) -> None:
    async with asyncio.timeout(WAIT_S):
        while True:
            if any(e.get("offset") == offset for e in got):
                return
            await asyncio.sleep(0.02)


async def _pad_aof(redis: Redis, prefix: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(FILLER_KEYS):
            pipe.set(f"{prefix}:filler:{i}", "x")
        await pipe.execute()


async def test_streams_survive_a_redis_restart_mid_stream(tmp_path: Path) -> None:
    words = [f" w{i}" for i in range(40)]
    (tmp_path / "redis").mkdir()
    with restartable_redis(tmp_path / "redis") as server:
        settings = Settings(
            redis_url=server.url, key_prefix=f"tbt-{uuid.uuid4().hex[:8]}", secret="s"
        )
        keys = Keys(settings.key_prefix)
        redis = connect(settings)
        pub = SessionPublisher(redis, keys, history_maxlen=1000, ttl_s=600)
        log = tmp_path / "gateway.log"
        async with (
            gateway_process(settings, log) as (base, proc),
            aiohttp.ClientSession() as http,
        ):
            async with http.post(f"{base}/v1/sessions") as response:
                session = await response.json()
            sid, auth = session["session_id"], {"Authorization": f"Bearer {session['token']}"}
            messages_url = f"{base}/v1/sessions/{sid}/messages"
            ws = await http.ws_connect(session["ws_url"])
            await follow(ws, sid)
            ws_got: list[dict[str, Any]] = []
            sse_got: list[dict[str, Any]] = []
            ws_task = asyncio.create_task(_ws_follow(ws, ws_got))
            sse_task = asyncio.create_task(_sse_follow(http, session["sse_url"], sse_got))
            await asyncio.sleep(0.5)  # both follow the session before anything is published

            first = [StreamStart(job_id="j1", model="m")] + [
                Delta(job_id="j1", delta=w, t=0.0) for w in words[:20]
            ]
            await _publish(pub, sid, first)
            await _pad_aof(redis, settings.key_prefix)
            # Mid-stream: both clients have what was published so far.
            await _wait_for_offset(ws_got, len(first))
            await _wait_for_offset(sse_got, len(first))

            server.kill()
            await _until_status(http, f"{base}/readyz", 503)
            assert await _status(http, "GET", messages_url, headers=auth) == 503
            # A new follower is told, not left hanging: an error, then a close.
            async with http.ws_connect(session["ws_url"]) as late:
                await late.send_json({"session_id": sid, "connect": True})
                assert (await late.receive_json())["type"] == "connected"
                error = await late.receive_json()
                assert (error["type"], error["code"]) == ("error", "unavailable")
                assert (await late.receive()).type is aiohttp.WSMsgType.CLOSE
                assert late.close_code == CLOSE_UNAVAILABLE

            # Back, loading its AOF slowly: LOADING until it is done.
            server.start("--key-load-delay", "300", wait=False)
            server.wait_ready(timeout=WAIT_S)
            rest = [Delta(job_id="j1", delta=w, t=0.0) for w in words[20:]]
            await _publish(pub, sid, [*rest, StreamEnd(job_id="j1", finish_reason="stop")])

            ws_events, sse_events_ = await asyncio.gather(ws_task, sse_task)
            await ws.close()
            await _until_status(http, f"{base}/readyz", 200)
            # Pooled connections made before the restart are retried, not answered with 503.
            statuses = await asyncio.gather(
                *(_status(http, "GET", messages_url, headers=auth) for _ in range(8))
            )
            assert statuses == [200] * 8
            assert proc.poll() is None, "the gateway process died"
        await redis.aclose()

    for events in (ws_events, sse_events_):
        if any(e.get("type") == "resync" for e in events):
            raise AssertionError(f"nothing was lost (AOF, fsync always): no resync {events}")
        assert answer_text(events) == "".join(words)
        assert_contiguous(events)
        assert [e["offset"] for e in events if "offset" in e] == list(range(1, len(words) + 3))
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    seen = {line["event"] for line in lines}
    assert {"pubsub_lost", "pubsub_reconnected"} <= seen, seen


async def test_stale_pooled_connections_are_retried_after_a_restart(tmp_path: Path) -> None:
    with restartable_redis(tmp_path) as server:
        client = connect(Settings(redis_url=server.url))
        try:
            # Several pooled connections, each connected before the restart.
            await asyncio.gather(*(client.incr("n") for _ in range(8)))
            server.kill()
            server.start()
            got = await asyncio.gather(*(client.incr("n") for _ in range(8)))
            assert sorted(got) == list(range(9, 17))
        finally:
            with contextlib.suppress(RedisError):
                await client.aclose()
