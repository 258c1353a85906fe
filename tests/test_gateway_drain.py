"""SIGTERM on a gateway process: it drains, exits 0, and its clients go on elsewhere.

Real processes and real signals: gateways run as ``python -m gateway``; the worker runs in the
test on the synthetic engine, whose answer is known word for word, so what a client received is
counted against what the worker published: lost and duplicated words must both be zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from shared.client import Client, Transport
from shared.close_codes import CLOSE_DRAINING
from shared.codec import text
from shared.embedded_redis import free_port
from shared.jobs import get_record
from shared.keys import Keys
from shared.settings import Settings
from tests.clients import follow
from tests.servers import new_session, running_gateway, running_worker, settings_env, wait_ready

TRANSPORTS: list[Transport] = ["ws", "sse"]
#: Generous bounds on waits; never asserted as timings.
EXIT_BOUND_S = 30.0
WAIT_S = 30.0


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def exit_code(self) -> int:
        return await asyncio.to_thread(self.proc.wait, EXIT_BOUND_S)

    def logged(self, event: str) -> dict[str, Any]:
        """The gateway's one structured log line for ``event``."""
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if "{" in line]
        found = [line for line in lines if line.get("event") == event]
        assert len(found) == 1, (event, found)
        line: dict[str, Any] = found[0]
        return line


@contextlib.asynccontextmanager
async def gateway(settings: Settings, log: Path) -> AsyncIterator[GatewayProcess]:
    """``python -m gateway`` on a port of its own, its log (stderr) in ``log``."""
    port = free_port()
    env = settings_env(settings)
    env["TOKENBUS_HOST"] = "127.0.0.1"
    env["TOKENBUS_PORT"] = str(port)
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(f"{url}/readyz", proc)
        yield GatewayProcess(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait, 15)


@pytest.fixture
def slow(settings: Settings) -> Settings:
    """An answer long enough to drain a gateway in the middle of it."""
    return settings.model_copy(
        update={"synthetic_tokens_per_s": 20.0, "synthetic_tokens": 60, "batch_window_ms": 0.0}
    )


async def published_words(redis: Redis, keys: Keys, session_id: str, job_id: str) -> list[str]:
    raw = await redis.get(keys.job_text(session_id, job_id))
    assert raw is not None, "the worker published no text for this job"
    return text(raw).split()


def lost_and_duplicated(received: list[str], published: list[str]) -> tuple[int, int]:
    got, want = Counter(received), Counter(published)
    return sum((want - got).values()), sum((got - want).values())


async def wait_state(redis: Redis, keys: Keys, job_id: str, state: str) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        current = (await get_record(redis, keys, job_id)).get("state", "")
        if current == state or loop.time() > deadline:
            return current
        await asyncio.sleep(0.05)


# ---- the Python client, given both gateways ----------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_client_answer_survives_a_drained_gateway_whole(
    slow: Settings,
    redis: Redis,
    keys: Keys,
    tmp_path: Path,
    transport: Transport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenbus.client")
    async with (
        running_worker(slow),
        gateway(slow, tmp_path / "a.log") as first,
        gateway(slow, tmp_path / "b.log") as second,
        Client([first.url, second.url], transport=transport) as client,
    ):
        chat = await client.session()
        stream = chat.ask("Keep talking while the first gateway drains")
        parts: list[str] = []
        async for part in stream:
            parts.append(part)
            if len(parts) == 5:
                first.sigterm()
        assert await first.exit_code() == 0
        answer = stream.answer
        assert answer is not None and stream.job_id is not None
        published = await published_words(redis, keys, chat.session_id, stream.job_id)
        received = "".join(parts).split()
        assert lost_and_duplicated(received, published) == (0, 0)
        assert received == published and len(published) == slow.synthetic_tokens
        assert answer.text == "".join(parts) and answer.finish_reason == "stop"
        assert answer.usage.completion_tokens == slow.synthetic_tokens

        # It was the drain that moved the client: told so, it went on to the other gateway.
        draining = first.logged("gateway_draining")
        assert draining["signal"] == "SIGTERM"
        assert draining["websockets" if transport == "ws" else "sse"] == 1
        told = "(1012)" if transport == "ws" else "draining"
        assert any(told in r.getMessage() for r in caplog.records), "no drain notice seen"
        assert chat.reconnects >= 1 and client.base_url == second.url
        # At once, and straight to the other gateway: its first attempt there succeeded.
        moved = f"reconnected to {second.url} over {transport} after 1 attempt(s)"
        assert any(moved in r.getMessage() for r in caplog.records), "no direct reconnect"

        # The session goes on through the second gateway, requests included.
        after = await chat.ask("Still there?", max_tokens=3).text()
        assert after.text.split() == await published_words(
            redis, keys, chat.session_id, after.job_id
        )


async def test_client_request_refused_by_a_draining_gateway_goes_to_the_next(
    settings: Settings,
) -> None:
    """A 503 ``draining`` means the request was not handled: it is sent on, even a POST."""
    refused: list[str] = []

    async def draining(request: web.Request) -> web.Response:
        refused.append(f"{request.method} {request.path}")
        body = {"error": {"message": "shutting down", "type": "x", "code": "draining"}}
        return web.json_response(body, status=503, headers={"Retry-After": "1"})

    fake = web.Application()
    fake.router.add_route("*", "/{tail:.*}", draining)
    runner = web.AppRunner(fake)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with (
            running_worker(settings),
            running_gateway(settings) as base,
            Client([f"http://127.0.0.1:{port}", base]) as client,
        ):
            chat = await client.session()
            assert client.base_url == base
            answer = await chat.ask("Hello", max_tokens=4).text()
            assert answer.usage.completion_tokens == 4
    finally:
        await runner.cleanup()
    assert refused == ["POST /v1/sessions"]


# ---- what each kind of client sees, on the wire -------------------------------------------


async def read_sse_lines(response: aiohttp.ClientResponse) -> list[str]:
    """Every line of an event stream, to its end."""
    body = await response.content.read()
    return body.decode().splitlines()


def openai_frames(lines: list[str]) -> list[Any]:
    return [
        "[DONE]" if line == "data: [DONE]" else json.loads(line[6:])
        for line in lines
        if line.startswith("data: ")
    ]


async def first_content(response: aiohttp.ClientResponse) -> list[str]:
    """Lines of an OpenAI stream up to its first content chunk (the stream is committed)."""
    lines: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        lines.append(line)
        if line.startswith("data: {") and '"content"' in line and '"content":""' not in line:
            return lines
    raise AssertionError(f"the stream ended before any content: {lines}")


async def running_job_ids(redis: Redis, keys: Keys, count: int) -> list[str]:
    """Ids of the first ``count`` jobs the worker runs (OpenAI requests make their own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    prefix = keys.job("")
    while True:
        ids = []
        async for key in redis.scan_iter(match=f"{prefix}*"):
            job_id = text(key)[len(prefix) :]
            if ":" not in job_id and (await get_record(redis, keys, job_id)).get("state") == (
                "running"
            ):
                ids.append(job_id)
        if len(ids) >= count or loop.time() > deadline:
            return ids
        await asyncio.sleep(0.05)


async def test_sigterm_sends_clients_away_and_ends_openai_answers_at_the_deadline(
    slow: Settings, redis: Redis, keys: Keys, tmp_path: Path
) -> None:
    # OpenAI answers far longer than the drain bound: they are cut, with an explicit error.
    settings = slow.model_copy(update={"synthetic_tokens": 200, "gateway_drain_s": 2.0})
    chat = {"model": "synthetic", "messages": [{"role": "user", "content": "Go on and on"}]}
    async with (
        running_worker(settings),
        gateway(settings, tmp_path / "gateway.log") as gw,
        aiohttp.ClientSession() as http,
        # One connection, opened before the drain and kept: what a proxy's pool would reuse.
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as pooled,
    ):
        session = await new_session(http, gw.url)
        ws = await http.ws_connect(session["ws_url"])
        await follow(ws, session["session_id"])
        sse = await http.get(session["sse_url"])
        assert sse.status == 200
        whole = asyncio.create_task(http.post(f"{gw.url}/v1/chat/completions", json=chat))
        streamed = await http.post(f"{gw.url}/v1/chat/completions", json={**chat, "stream": True})
        assert streamed.status == 200
        before = await first_content(streamed)
        assert len(await running_job_ids(redis, keys, 2)) == 2  # both answers are under way
        async with pooled.get(f"{gw.url}/healthz") as response:
            assert response.status == 200

        gw.sigterm()

        # WebSocket: closed with the documented code.
        while (await ws.receive(timeout=WAIT_S)).type is not aiohttp.WSMsgType.CLOSE:
            pass
        assert ws.close_code == CLOSE_DRAINING
        # SSE: a retry hint and a `draining` notice, then the response ends.
        lines = await read_sse_lines(sse)
        assert "retry: 250" in lines
        notices = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert notices[-1]["type"] == "error" and notices[-1]["code"] == "draining"
        # A connection opened before: readiness says draining, new work is refused.
        async with pooled.get(f"{gw.url}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["status"] == "draining"
        async with pooled.post(f"{gw.url}/v1/sessions") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "draining"

        # OpenAI: streamed text so far, then an error chunk and [DONE]; the other one a 503.
        frames = openai_frames(before + await read_sse_lines(streamed))
        assert frames[-1] == "[DONE]"
        assert frames[-2]["error"]["code"] == "draining"
        assert any(f != "[DONE]" and "choices" in f for f in frames[:-2])
        response = await asyncio.wait_for(whole, WAIT_S)
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "draining"
        # Their jobs are cancelled: no one can resume an OpenAI answer.
        for job_id in (
            streamed.headers["X-Tokenbus-Job-Id"],
            response.headers["X-Tokenbus-Job-Id"],
        ):
            assert await wait_state(redis, keys, job_id, "cancelled") == "cancelled"

        assert await gw.exit_code() == 0
        await ws.close()
    draining, drained = gw.logged("gateway_draining"), gw.logged("gateway_drained")
    assert (draining["websockets"], draining["sse"], draining["openai"]) == (1, 1, 2)
    assert drained["websockets_closed"] == 1 and drained["sse_ended"] == 1
    assert drained["openai_cut"] == 2 and drained["openai_finished"] == 0
    assert drained["refused"] == 1 and drained["left"] == 0


async def test_openai_answers_that_end_within_the_bound_are_delivered_whole(
    slow: Settings, redis: Redis, keys: Keys, tmp_path: Path
) -> None:
    settings = slow.model_copy(update={"synthetic_tokens": 40, "gateway_drain_s": 60.0})
    chat = {"model": "synthetic", "messages": [{"role": "user", "content": "A short one"}]}
    async with (
        running_worker(settings),
        gateway(settings, tmp_path / "gateway.log") as gw,
        aiohttp.ClientSession() as http,
    ):
        whole = asyncio.create_task(http.post(f"{gw.url}/v1/chat/completions", json=chat))
        streamed = await http.post(f"{gw.url}/v1/chat/completions", json={**chat, "stream": True})
        before = await first_content(streamed)
        assert len(await running_job_ids(redis, keys, 2)) == 2
        gw.sigterm()
        frames = openai_frames(before + await read_sse_lines(streamed))
        assert frames[-1] == "[DONE]" and not any("error" in f for f in frames[:-1])
        assert frames[-2]["choices"][0]["finish_reason"] == "stop"
        job_id = streamed.headers["X-Tokenbus-Job-Id"]
        session_id = streamed.headers["X-Tokenbus-Session-Id"]
        content = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames[:-1])
        assert content.split() == await published_words(redis, keys, session_id, job_id)
        response = await asyncio.wait_for(whole, WAIT_S)
        assert response.status == 200
        body = await response.json()
        assert body["usage"]["completion_tokens"] == 40
        assert await gw.exit_code() == 0
    drained = gw.logged("gateway_drained")
    assert drained["openai_finished"] == 2 and drained["openai_cut"] == 0
