"""A gateway keeps no trace of sessions that ended, and OpenAI sessions expire soon.

Real Redis and real sockets; no worker: a model is made to look live, so OpenAI requests are
queued and the clients leave while they wait (each request still makes a session of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.app import create_app
from gateway.hub import Hub
from gateway.state import GATEWAY
from shared.embedded_redis import free_port
from shared.keys import META_TTL_FIELD, Keys
from shared.protocol import EventDict
from shared.redis_client import connect
from shared.settings import Settings
from tests.clients import follow
from tests.restartable_redis import restartable_redis

MODEL = "leak-test-model"


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[str, web.Application]]:
    """The gateway on a free port, and its app (to look inside its hub)."""
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


def _all_empty(hub: Hub) -> Callable[[], bool]:
    return lambda: hub.channels == 0 and not any(hub.tracked().values())


async def _queued_openai_request(http: aiohttp.ClientSession, base: str) -> str:
    """A streaming request that is queued (no worker takes it); leaves after its first
    keep-alive. Returns the session id the gateway made for it."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with http.post(f"{base}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.content.readline()  # ": keep-alive"
        return response.headers["X-Tokenbus-Session-Id"]


async def test_sessions_that_come_and_go_leave_the_hub_empty(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    settings = settings.model_copy(update={"keepalive_s": 0.1})
    await redis.zadd(keys.models, {MODEL: time.time() + 3600})
    async with served(settings) as (base, app), aiohttp.ClientSession() as http:
        hub = app[GATEWAY].hub
        for _ in range(8):
            await _queued_openai_request(http, base)
            async with http.post(f"{base}/v1/sessions") as response:
                session: dict[str, Any] = await response.json()
            async with http.ws_connect(session["ws_url"]) as ws:
                await follow(ws, session["session_id"])
            async with http.get(session["sse_url"]) as response:
                await response.content.readline()  # retry:, sent once the stream is open
                # The SSE stream subscribes beside its write loop: wait until it has.
                await _until(lambda: hub.channels > 0)
        assert hub.alive
        await _until(_all_empty(hub))


class _Quiet:
    def on_event(self, event: EventDict, raw: str) -> None:
        raise AssertionError("no event expected")

    def on_resubscribed(self) -> None:
        pass


async def test_a_subscribe_that_fails_leaves_nothing_behind(
    settings: Settings, tmp_path: Path
) -> None:
    with restartable_redis(tmp_path) as server:
        hub = Hub(connect(Settings(redis_url=server.url), retries=0), subscribe_timeout_s=0.5)
        await hub.start()
        try:
            sub = _Quiet()
            # Redis takes the SUBSCRIBE but never confirms it (the process is stopped).
            server.pause()
            with pytest.raises(RedisTimeoutError):
                await hub.attach("c1", sub)
            assert hub.channels == 0 and hub.tracked()["ready"] == 0
            server.resume()
            await _until(_all_empty(hub))  # its late confirmation is counted, then forgotten
            await hub.attach("c1", sub)  # and the channel works as if nothing happened
            hub.detach("c1", sub)
            await _until(_all_empty(hub))

            # While the pub/sub connection is down, an attach fails at once, with nothing kept.
            server.kill()
            await _until(lambda: not hub.connected)
            with pytest.raises(RedisConnectionError):
                await hub.attach("c2", sub)
            assert _all_empty(hub)()
        finally:
            server.resume()
            await hub.close()


async def test_an_openai_session_gets_a_short_ttl(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    """Set before the job is queued: the publish script keeps the session's keys that long."""
    ttl = 42
    settings = settings.model_copy(update={"keepalive_s": 0.1, "openai_history_ttl_s": ttl})
    assert settings.history_ttl_s > ttl
    await redis.zadd(keys.models, {MODEL: time.time() + 3600})
    async with served(settings) as (base, _), aiohttp.ClientSession() as http:
        session_id = await _queued_openai_request(http, base)
        meta = keys.session_meta(session_id)
        assert await redis.hget(meta, META_TTL_FIELD) == str(ttl).encode()
        assert 0 < await redis.ttl(meta) <= ttl
