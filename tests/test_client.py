"""shared.client against a real stack on real sockets: asks, errors, and resumes across drops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from shared.client import (
    Answer,
    Client,
    ConnectionLostError,
    ResyncError,
    TokenbusError,
    Transport,
    _SseLink,
)
from shared.embedded_redis import free_port
from shared.keys import Keys
from shared.protocol import ChatMessage, Job, SamplingParams
from shared.settings import Settings
from shared.stream.position import HISTORY_FIELD
from tests.servers import running_worker, settings_env, stack, wait_ready
from workers.synthetic import synthetic_text

TRANSPORTS: list[Transport] = ["ws", "sse"]


def chat_answer(session_id: str, content: str, seed: int, n: int) -> str:
    """The synthetic engine's answer to a first user turn sent with ``seed``."""
    job = Job(
        session_id=session_id,
        messages=[ChatMessage(role="user", content=content)],
        sampling=SamplingParams(seed=seed),
    )
    return "".join(synthetic_text(job, n))


async def published_text(redis: Redis, keys: Keys, session_id: str, job_id: str) -> str:
    """Every text the worker published for the job."""
    raw = await redis.get(keys.job_text(session_id, job_id))
    assert raw is not None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


@pytest.fixture
def slow(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"synthetic_tokens_per_s": 20.0, "synthetic_tokens": 400, "batch_window_ms": 0.0}
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ask_streams_the_answer_and_text_collects_it(
    settings: Settings, redis: Redis, keys: Keys, transport: Transport
) -> None:
    n = settings.synthetic_tokens
    async with stack(settings) as (base, _), Client(base, transport=transport) as client:
        chat = await client.session()
        assert chat.transport == transport
        stream = chat.ask("What is the capital of France?", seed=1)
        parts = [text async for text in stream]
        assert stream.answer is not None and stream.job_id is not None
        first = "".join(parts)
        assert first == chat_answer(chat.session_id, "What is the capital of France?", 1, n)
        assert stream.answer.text == first
        assert stream.answer.finish_reason == "stop"
        assert stream.answer.usage.completion_tokens == n
        assert stream.answer.model == "synthetic"

        # The second turn has the first as context; the worker published exactly this.
        answer = await chat.ask("And of Italy?", temperature=0, max_tokens=10).text()
        assert isinstance(answer, Answer)
        assert answer.text == await published_text(redis, keys, chat.session_id, answer.job_id)
        assert answer.finish_reason == "length"
        assert answer.usage.completion_tokens == 10

        raw = await chat.ask(prompt="Once upon a time", seed=7).text()
        assert raw.text == await published_text(redis, keys, chat.session_id, raw.job_id)
        assert chat.reconnects == 0


async def test_each_session_chooses_its_transport(settings: Settings) -> None:
    async with stack(settings) as (base, _), Client(base, transport="ws") as client:
        ws_chat = await client.session()
        sse_chat = await client.session(transport="sse")
        ws_answer, sse_answer = await asyncio.gather(
            ws_chat.ask("Same question", seed=3).text(),
            sse_chat.ask("Same question", seed=3).text(),
        )
        assert ws_answer.text == sse_answer.text != ""


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_send_then_cancel_ends_with_cancelled(slow: Settings, transport: Transport) -> None:
    async with stack(slow) as (base, _), Client(base, transport=transport) as client:
        chat = await client.session()
        # Cancel while streaming.
        stream = chat.ask("Tell me a long story")
        deltas = 0
        async for _ in stream:
            deltas += 1
            if deltas == 3:
                await stream.cancel()
        assert stream.answer is not None
        assert stream.answer.finish_reason == "cancelled"
        assert stream.answer.usage.completion_tokens < slow.synthetic_tokens

        # Cancel a job only enqueued, then follow it: it ends cancelled too.
        job_id = await chat.send("Another long one", max_tokens=300, temperature=0, seed=1)
        assert await chat.cancel(job_id) in ("cancelling", "cancelled")
        answer = await chat.stream(job_id).text()
        assert answer.job_id == job_id and answer.finish_reason == "cancelled"
        record = await chat.job(job_id)
        assert record["state"] == "cancelled"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_events_yields_every_session_event_once_in_order(
    settings: Settings, transport: Transport
) -> None:
    async with stack(settings) as (base, _), Client(base, transport=transport) as client:
        chat = await client.session()
        first = await chat.send("one", seed=1)
        second = await chat.send(prompt="two", seed=2)
        events: list[dict[str, Any]] = []
        ends = 0
        async for event in chat.events():
            events.append(event)
            ends += event["type"] == "stream_end"
            if ends == 2:
                break
        offsets = [e["offset"] for e in events]
        assert offsets == list(range(1, len(events) + 1))
        assert len({e["epoch"] for e in events}) == 1
        assert {e["job_id"] for e in events} == {first, second}
        assert chat.position == (events[-1]["epoch"], events[-1]["offset"])
        # A reopened session replays what the server keeps, from where it is told.
        again = await client.session(chat.session_id, chat.token, transport=transport)
        replay = []
        async for event in again.events(after=(events[0]["epoch"], 2)):
            replay.append(event)
            if event["offset"] == events[-1]["offset"]:
                break
        # A replay may merge consecutive deltas of a job (README, Events): the same text, and
        # offsets that stay contiguous counting from each merged delta's from_offset.
        expected = events[2]["offset"]
        for event in replay:
            assert event.get("from_offset", event["offset"]) == expected
            expected = event["offset"] + 1
        assert expected == events[-1]["offset"] + 1
        assert "".join(e.get("delta", "") for e in replay) == "".join(
            e.get("delta", "") for e in events[2:]
        )
        assert [e for e in replay if e["type"] != "delta"] == [
            e for e in events[2:] if e["type"] != "delta"
        ]


async def test_bad_client_arguments_are_refused_before_any_request() -> None:
    with pytest.raises(ValueError, match="transport must be 'ws' or 'sse'"):
        Client("http://127.0.0.1:1", transport="udp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="submit_retries must be 0 or more"):
        Client("http://127.0.0.1:1", submit_retries=-1)
    # Port 1: nothing listens, so a request sent by mistake would fail differently.
    async with Client("http://127.0.0.1:1") as client:
        with pytest.raises(TypeError, match="needs both session_id and token"):
            await client.session("s_only-the-id")
        with pytest.raises(TypeError, match="needs both session_id and token"):
            await client.session(token="only-a-token")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_gateway_errors_raise_tokenbus_error(
    settings: Settings, transport: Transport
) -> None:
    async with stack(settings) as (base, _), Client(base, transport=transport) as client:
        chat = await client.session()
        with pytest.raises(TokenbusError) as info:
            await chat.ask("hello", model="no-such-model").text()
        assert info.value.status == 404 and info.value.code == "model_not_found"
        assert "no-such-model" in info.value.message

        with pytest.raises(TokenbusError) as info:
            await chat.send("hello", temperature=5)
        assert info.value.status == 400 and info.value.param == "temperature"

        with pytest.raises(TypeError):
            chat.ask("both", prompt="given")

        stranger = await client.session(chat.session_id, "not-the-token")
        with pytest.raises(TokenbusError) as info:
            await stranger.send("let me in")
        assert info.value.status == 401 and info.value.code == "unauthorized"
        # Following the session needs its token too, whatever the transport.
        with pytest.raises(TokenbusError) as info:
            async for _ in stranger.events():
                pass
        assert info.value.status == 401


async def test_api_key_is_sent_when_creating_sessions(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": "key-one,key-two"})
    async with stack(keyed) as (base, _):
        async with Client(base) as anonymous:
            with pytest.raises(TokenbusError) as info:
                await anonymous.session()
            assert info.value.status == 401 and info.value.code == "invalid_api_key"
        async with Client(base, api_key="key-two") as client:
            chat = await client.session()
            answer = await chat.ask("hello", max_tokens=2).text()
            assert answer.usage.completion_tokens == 2


async def test_a_failed_job_raises_with_its_code(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, _), Client(base) as client:
        chat = await client.session()
        stream = chat.ask("too late", timeout_s=0.001)
        with pytest.raises(TokenbusError) as info:
            await stream.text()
        assert info.value.code == "deadline_exceeded" and info.value.job_id == stream.job_id
        assert info.value.status is None
        with pytest.raises(TokenbusError):
            await stream.text()  # a finished stream keeps its outcome


# A gateway process on a port of the test's choosing, so a new one can take the old one's place.


class GatewayProcess:
    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        env = settings_env(self.settings)
        env["TOKENBUS_PORT"] = str(self.port)
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
        self.starts += 1
        await wait_ready(f"{self.url}/readyz", self.proc)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 15)

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, 15)


@contextlib.asynccontextmanager
async def gateway_on_fixed_port(settings: Settings) -> AsyncIterator[GatewayProcess]:
    gateway = GatewayProcess(settings, free_port())
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ask_resumes_across_a_gateway_restart(
    slow: Settings,
    redis: Redis,
    keys: Keys,
    transport: Transport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = slow.model_copy(update={"synthetic_tokens": 60})
    caplog.set_level(logging.INFO, logger="tokenbus.client")
    async with (
        running_worker(settings),
        gateway_on_fixed_port(settings) as gateway,
        Client(gateway.url, transport=transport) as client,
    ):
        chat = await client.session()
        stream = chat.ask("Keep talking while the gateway restarts")
        parts: list[str] = []
        restart: asyncio.Task[None] | None = None
        async for text in stream:
            parts.append(text)
            if len(parts) == 5:
                # Restarted in the background: the client meets refused connections meanwhile.
                restart = asyncio.create_task(gateway.restart())
        assert restart is not None
        await restart
        answer = stream.answer
        assert answer is not None and stream.job_id is not None
        assert gateway.starts == 2
        published = await published_text(redis, keys, chat.session_id, stream.job_id)
        assert "".join(parts) == answer.text == published
        assert answer.finish_reason == "stop"
        assert answer.usage.completion_tokens == settings.synthetic_tokens
        assert chat.reconnects >= 1 and stream.reconnects == chat.reconnects
        assert any("reconnected" in r.getMessage() for r in caplog.records)

        # The session goes on as before on the new process.
        after = await chat.ask("Still there?", max_tokens=3).text()
        assert after.text == await published_text(redis, keys, chat.session_id, after.job_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_events_resume_across_a_gateway_restart(slow: Settings, transport: Transport) -> None:
    settings = slow.model_copy(update={"synthetic_tokens": 40})
    async with (
        running_worker(settings),
        gateway_on_fixed_port(settings) as gateway,
        Client(gateway.url, transport=transport) as client,
    ):
        chat = await client.session()
        job_id = await chat.send("Events across a restart")
        events: list[dict[str, Any]] = []
        async for event in chat.events():
            events.append(event)
            if len(events) == 4:
                await gateway.restart()  # the job goes on meanwhile: history has it
            if event["type"] == "stream_end":
                break
        # Contiguous: a replayed backlog may come merged into one delta that says where it
        # starts (`from_offset`, documented), never with a gap.
        last = 0
        for e in events:
            assert e.get("from_offset", e["offset"]) == last + 1, events
            last = e["offset"]
        assert {e["job_id"] for e in events} == {job_id}
        # Every token once; under load the worker may batch two tokens into one delta.
        assert sum(e["tokens"] for e in events if e["type"] == "delta") == 40
        assert chat.reconnects >= 1


async def test_reconnecting_gives_up_after_reconnect_timeout(settings: Settings) -> None:
    async with (
        running_worker(settings),
        gateway_on_fixed_port(settings) as gateway,
        Client(gateway.url, reconnect_timeout_s=0.5) as client,
    ):
        chat = await client.session()
        await chat.ask("warm up").text()
        await gateway.kill()
        with pytest.raises(TokenbusError) as info:
            await chat.ask("anyone?").text()
        assert info.value.code == "connection_lost"


# Resync: the history no longer holds what the client needs.


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resync_is_an_event_for_events_and_an_error_for_ask(
    settings: Settings, transport: Transport
) -> None:
    # History trims whole stream nodes (MAXLEN ~): a few hundred events leave only the last ones.
    n = 400
    small = settings.model_copy(
        update={
            "history_maxlen": 10,
            "synthetic_tokens": n,
            "synthetic_tokens_per_s": 1000.0,
            "batch_window_ms": 0.0,
        }
    )
    async with stack(small) as (base, _), Client(base, transport=transport) as client:
        chat = await client.session()
        stream = chat.ask("fills the history", seed=1, max_tokens=n)
        done = await stream.text()  # followed live from before it started: complete
        assert done.text == chat_answer(chat.session_id, "fills the history", 1, n)
        # From the start again: the history no longer holds the job's beginning.
        later = await client.session(chat.session_id, chat.token, transport=transport)
        with pytest.raises(ResyncError) as info:
            await later.stream(done.job_id).text()
        assert info.value.reason == "history_trimmed" and info.value.job_id == done.job_id
        # A new question from there: the gap is before the job, so its answer is whole.
        fresh = await client.session(chat.session_id, chat.token, transport=transport)
        whole = await fresh.ask(prompt="after the gap", max_tokens=5).text()
        assert whole.finish_reason == "length" and len(whole.text.split()) == 5
        # events() reports the gap and goes on after it.
        async for event in later.events(after=(None, 0)):
            assert event["type"] == "resync" and event["reason"] == "history_trimmed"
            break


async def test_sse_parser_handles_crlf_cr_and_split_chunks() -> None:
    """The SSE reader copes with any line end, and with lines (and characters) split anywhere."""
    body = (
        'retry: 1000\r\n\r\n: keep-alive\r\rid: e:1\r\ndata: {"type":"delta",\r\n'
        'data: "delta":"a\\u2028bé","offset":1}\n\nid: e:2\rdata: {"offset":2,"type":"x"}\r\r'
    ).encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(len(body)):  # one byte at a time
            await response.write(body[i : i + 1])
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            link = await _SseLink.open(
                http,
                f"http://127.0.0.1:{port}/",
                token="t",
                position=("e", 0),
                connect_timeout_s=5,
                idle_timeout_s=5,
            )
            first, second = await link.receive(), await link.receive()
            await link.close()
    finally:
        await runner.cleanup()
    assert first == {"type": "delta", "delta": "a\u2028bé", "offset": 1}
    assert second == {"offset": 2, "type": "x"}


# Drops the gateway asks the client to resume from: a fake gateway that drops every few events.


class DroppingGateway:
    """Serves one job's events, ending each connection after ``every`` of them in turn by a
    slow-consumer close (WS 4008 / SSE error), an unavailable close (4011) and a cut socket.
    """

    def __init__(self, text: list[str], every: int = 3) -> None:
        self.epoch = "e0"
        self.events: list[dict[str, Any]] = [
            {"type": "stream_start", "job_id": "j1", "model": "fake"},
            *({"type": "delta", "job_id": "j1", "delta": t} for t in text),
            {"type": "stream_end", "job_id": "j1", "finish_reason": "stop", "usage": {}},
        ]
        for offset, event in enumerate(self.events, start=1):
            event.update(epoch=self.epoch, offset=offset)
        self.every = every
        self.connections = 0
        self.positions: list[tuple[str | None, int]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/sessions", self.create_session)
        app.router.add_post("/v1/sessions/{sid}/jobs", self.create_job)
        app.router.add_get("/v1/sessions/{sid}/events", self.sse)
        app.router.add_get("/v1/ws", self.ws)
        return app

    async def create_session(self, request: web.Request) -> web.Response:
        return web.json_response({"session_id": "s1", "token": "t1"}, status=201)

    async def create_job(self, request: web.Request) -> web.Response:
        return web.json_response({"job_id": "j1"}, status=202)

    def batch(self, offset: int) -> tuple[list[dict[str, Any]], str]:
        """Events after ``offset`` this connection sends, and how it then ends."""
        self.connections += 1
        ending = ("slow", "unavailable", "cut")[(self.connections - 1) % 3]
        return self.events[offset : offset + self.every], ending

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        connect = json.loads((await ws.receive()).data)
        assert connect["type"] == "connect" and connect["token"] == "t1"
        offset = connect["offset"]
        self.positions.append((connect.get("epoch"), offset))
        await ws.send_json({"type": "connected", "session_id": "s1", "offset": offset})
        batch, ending = self.batch(offset)
        for event in batch:
            await ws.send_json(event)
        if offset + len(batch) == len(self.events):
            await asyncio.sleep(30)  # all sent: the client leaves
        elif ending == "slow":
            await ws.send_json({"type": "error", "code": "slow_consumer", "message": "slow"})
            await ws.close(code=4008, message=b"slow consumer")
        elif ending == "unavailable":
            await ws.close(code=4011, message=b"unavailable")
        else:
            assert request.transport is not None
            request.transport.abort()  # 1006 for the client
        return ws

    async def sse(self, request: web.Request) -> web.StreamResponse:
        assert request.headers["Authorization"] == "Bearer t1"
        last = request.headers.get("Last-Event-ID")
        epoch, _, offset = last.rpartition(":") if last else ("", "", "0")
        self.positions.append((epoch or None, int(offset)))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        batch, ending = self.batch(int(offset))
        for event in batch:
            data = json.dumps(event)
            await response.write(f"id: {self.epoch}:{event['offset']}\ndata: {data}\n\n".encode())
        if int(offset) + len(batch) == len(self.events):
            await asyncio.sleep(30)
        elif ending == "slow":
            error = {"type": "error", "code": "slow_consumer", "message": "slow"}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        elif ending == "cut":
            assert request.transport is not None
            request.transport.abort()
        return response


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_drops_are_resumed_from_the_last_event_delivered(transport: Transport) -> None:
    text = [f" w{i}" for i in range(20)]
    fake = DroppingGateway(text)
    async with serving(fake.app()) as base, Client(base, transport=transport) as client:
        chat = await client.session()
        answer = await chat.ask("go").text()
    assert answer.text == "".join(text) and answer.finish_reason == "stop"
    # 22 events, 3 a connection: 8 connections, each from where the last one stopped.
    assert fake.positions == [(None, 0)] + [("e0", n) for n in range(3, 22, 3)]
    assert chat.reconnects == 7


async def test_a_gateway_that_drops_without_progress_is_given_up_on() -> None:
    fake = DroppingGateway(["x"] * 10, every=0)  # connects, then drops before any event
    async with (
        serving(fake.app()) as base,
        Client(base, reconnect_timeout_s=1.0, backoff_s=0.05, max_backoff_s=0.2) as client,
    ):
        chat = await client.session()
        with pytest.raises(ConnectionLostError) as info:
            async for _ in chat.events():
                pass
    assert "no progress" in info.value.message
    assert fake.connections > 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_backlog_larger_than_the_client_queue_is_resumed(
    settings: Settings, transport: Transport
) -> None:
    small_queue = settings.model_copy(update={"client_queue_events": 16})
    async with (
        stack(small_queue) as (base, _),
        Client(base, transport=transport, reconnect_timeout_s=2.0) as client,
    ):
        chat = await client.session()
        for i in range(8):  # read live, each answer fits: 3 events (start, delta, end) or more
            await chat.ask(prompt=f"job {i}", max_tokens=2).text()
        last = chat.position
        later = await client.session(chat.session_id, chat.token, transport=transport)
        replayed = []
        async for event in later.events():
            replayed.append(event)
            if event["offset"] == last[1]:
                break
        assert [e["offset"] for e in replayed] == list(range(1, last[1] + 1))


# Idempotent submissions: a job POST whose reply is lost is sent again with the same key.


#: Request headers not to forward (hop-by-hop, or set by the proxy's own client).
_HOP = {"host", "connection", "upgrade", "keep-alive", "transfer-encoding", "content-length"}


class LosingProxy:
    """A transparent proxy to one gateway (HTTP, SSE streamed, WebSocket) that loses the
    replies of job POSTs: the first ``lose`` of them are forwarded and their reply read in full
    (the gateway handled them), then the client's connection is cut without an answer.
    """

    def __init__(self, target: str, http: aiohttp.ClientSession, lose: int = 1) -> None:
        self.target = target
        self.http = http
        self.lose = lose
        #: (status, reply) of every job POST the gateway answered, and the key each carried.
        self.job_posts: list[tuple[int, dict[str, Any]]] = []
        self.keys: list[str | None] = []
        self.cut = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        is_job_post = request.method == "POST" and request.path.endswith("/jobs")
        async with self.http.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=await request.read(),
            timeout=aiohttp.ClientTimeout(total=None),
        ) as upstream:
            if is_job_post:
                self.keys.append(request.headers.get("Idempotency-Key"))
                reply = json.loads(await upstream.read())
                self.job_posts.append((upstream.status, reply))
                if self.cut < self.lose:
                    self.cut += 1
                    assert request.transport is not None
                    request.transport.abort()  # handled upstream; the client never hears
                    return web.Response()
                return web.json_response(reply, status=upstream.status)
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Cache-Control", "X-Accel-Buffering"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse()
        await client.prepare(request)
        url = "ws" + self.target[4:] + request.path_qs
        async with self.http.ws_connect(url) as server:

            async def pump(
                src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
            ) -> None:
                async for message in src:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        await dst.send_str(message.data)
                await dst.close(code=src.close_code or 1000)

            tasks = [
                asyncio.create_task(pump(client, server)),
                asyncio.create_task(pump(server, client)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return client


@contextlib.asynccontextmanager
async def losing_proxy(target: str, lose: int = 1) -> AsyncIterator[tuple[str, LosingProxy]]:
    async with aiohttp.ClientSession() as http:
        proxy = LosingProxy(target, http, lose)
        async with serving(proxy.app()) as base:
            yield base, proxy


async def session_history(redis: Redis, keys: Keys, session_id: str) -> list[dict[str, Any]]:
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.session_history(session_id))
    )
    return [json.loads(fields[HISTORY_FIELD.encode()]) for _, fields in entries]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_job_post_whose_reply_is_lost_is_sent_again_and_makes_one_job(
    settings: Settings, redis: Redis, keys: Keys, transport: Transport
) -> None:
    async with (
        stack(settings) as (base, _),
        losing_proxy(base) as (proxy_url, proxy),
        Client(proxy_url, transport=transport) as client,
    ):
        chat = await client.session()
        stream = chat.ask("Answer me once", seed=5)
        parts = [text async for text in stream]
        answer = stream.answer
        assert answer is not None and stream.job_id is not None
        # The first POST reached the gateway, which enqueued the job; its reply was lost. The
        # client sent it again with the same key and got the same job back.
        assert proxy.cut == 1
        (first_status, first), (second_status, second) = proxy.job_posts
        assert (first_status, second_status) == (202, 200)
        assert first["job_id"] == second["job_id"] == stream.job_id
        assert second["replayed"] is True
        assert proxy.keys == [stream.idempotency_key] * 2 and stream.idempotency_key
        # One job, one answer, delivered once.
        assert await redis.xlen(keys.jobs_stream(settings.model)) == 1
        events = await session_history(redis, keys, chat.session_id)
        assert [e["job_id"] for e in events if e["type"] == "stream_start"] == [stream.job_id]
        n = settings.synthetic_tokens
        assert "".join(parts) == answer.text == chat_answer(chat.session_id, "Answer me once", 5, n)
        assert answer.text == await published_text(redis, keys, chat.session_id, stream.job_id)
        assert answer.usage.completion_tokens == n


async def test_send_retries_with_the_callers_key_and_gives_up_after_submit_retries(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with (
        stack(settings) as (base, _),
        losing_proxy(base, lose=100) as (proxy_url, proxy),
        Client(proxy_url, submit_retries=2, backoff_s=0.01) as client,
    ):
        chat = await client.session()
        # Every reply lost: the first attempt and two retries, all with the caller's key.
        with pytest.raises(ConnectionLostError) as info:
            await chat.send("Lost replies", idempotency_key="my-key-1")
        assert "my-key-1" in info.value.message
        assert proxy.keys == ["my-key-1"] * 3
        job_ids = {reply["job_id"] for _, reply in proxy.job_posts}
        assert [status for status, _ in proxy.job_posts] == [202, 200, 200]
        assert len(job_ids) == 1
        # The caller retries the same submission: the same job, still one in the stream.
        proxy.lose = 0
        again = await chat.send("Lost replies", idempotency_key="my-key-1")
        assert {again} == job_ids
        assert await redis.xlen(keys.jobs_stream(settings.model)) == 1
        # A new submission gets a fresh key of its own.
        other = await chat.send("Lost replies")
        assert other != again and proxy.keys[-1] not in (None, "my-key-1")
        assert await redis.xlen(keys.jobs_stream(settings.model)) == 2
        # The same key for something else is the gateway's 409.
        with pytest.raises(TokenbusError) as conflict:
            await chat.send("Something else", idempotency_key="my-key-1")
        assert conflict.value.status == 409 and conflict.value.code == "idempotency_conflict"
