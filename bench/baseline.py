"""``python -m bench.baseline --port P``: the broker-less baseline of ``tokenbus bench fabric``.

One aiohttp process (uvloop) that answers the same client-visible flow as a gateway, with
as little as that takes: ``POST /v1/sessions``, SSE ``GET /v1/sessions/{id}/events``, the
``/v1/ws`` WebSocket (``connect`` message, ``connected`` answer) and
``POST /v1/sessions/{id}/jobs``. Each job runs the worker's own :class:`SyntheticEngine`
(the same ``TOKENBUS_SYNTHETIC_*`` settings, the same schedule) in this process, and its
events go straight to the session's queue: no Redis, no history, no resume. Events are framed
as the gateway frames them (SSE ``id: <epoch>:<offset>`` and ``data: <json>``, WebSocket text
frames of the same JSON, with the same fields, ``t`` included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from typing import Any

from aiohttp import WSMsgType, web

from bench.load import raise_nofile
from shared.protocol import Job, SamplingParams
from shared.settings import Settings
from workers.synthetic import SyntheticEngine

MODEL = "synthetic"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
BATCH = 64  # events written at once to an SSE stream, as the gateway does


class Session:
    __slots__ = ("epoch", "offset", "queue", "token")

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(16)
        self.epoch = secrets.token_hex(6)
        self.offset = 0
        self.queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def publish(self, event: dict[str, Any]) -> None:
        self.offset += 1
        body = {"epoch": self.epoch, "offset": self.offset, **event}
        self.queue.put_nowait((self.offset, json.dumps(body, separators=(",", ":"))))


SESSIONS: dict[str, Session] = {}
ENGINE = web.AppKey("engine", SyntheticEngine)
TASKS: set[asyncio.Task[None]] = set()


def _session(request: web.Request, token: str | None) -> Session:
    session = SESSIONS.get(request.match_info.get("session_id", ""))
    if session is None or token != session.token:
        raise web.HTTPUnauthorized()
    return session


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    return value[7:] if value.startswith("Bearer ") else request.query.get("token")


async def ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


async def create_session(request: web.Request) -> web.Response:
    session_id = "s_" + secrets.token_hex(8)
    session = SESSIONS[session_id] = Session()
    return web.json_response({"session_id": session_id, "token": session.token}, status=201)


async def create_job(request: web.Request) -> web.Response:
    session = _session(request, _bearer(request))
    body = await request.json()
    session_id = request.match_info["session_id"]
    job = Job(
        session_id=session_id,
        model=MODEL,
        prompt=body["prompt"],
        sampling=SamplingParams(seed=body.get("seed")),
        max_tokens=body.get("max_tokens"),
    )
    task = asyncio.create_task(_run(request.app[ENGINE], session, job))
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)
    return web.json_response(
        {"job_id": job.id, "session_id": session_id, "model": MODEL, "state": "queued"}, status=202
    )


async def _run(engine: SyntheticEngine, session: Session, job: Job) -> None:
    session.publish(
        {
            "type": "stream_start",
            "job_id": job.id,
            "model": MODEL,
            "attempt": 0,
            "created_at": job.created_at,
        }
    )
    async for d in engine.generate(job):
        if d.text:
            session.publish(
                {"type": "delta", "job_id": job.id, "delta": d.text, "tokens": d.tokens, "t": d.t}
            )
        if d.finish_reason is not None:
            usage = d.usage.model_dump() if d.usage is not None else {}
            session.publish(
                {
                    "type": "stream_end",
                    "job_id": job.id,
                    "finish_reason": d.finish_reason,
                    "usage": usage,
                }
            )


async def session_events(request: web.Request) -> web.StreamResponse:
    session = _session(request, request.query.get("token"))
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    queue = session.queue
    while True:
        batch = [await queue.get()]
        while not queue.empty() and len(batch) < BATCH:
            batch.append(queue.get_nowait())
        await response.write(
            "".join(f"id: {session.epoch}:{o}\ndata: {text}\n\n" for o, text in batch).encode()
        )


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    hello = await ws.receive_json()
    session = SESSIONS.get(hello.get("session_id", ""))
    if session is None or hello.get("token") != session.token:
        await ws.close(code=4401)
        return ws
    await ws.send_json(
        {"type": "connected", "session_id": hello["session_id"], "epoch": None, "offset": 0}
    )

    async def forward() -> None:
        while True:
            _, text = await session.queue.get()
            await ws.send_str(text)

    forwarding = asyncio.create_task(forward())
    try:
        async for msg in ws:  # until the client closes
            if msg.type != WSMsgType.TEXT:
                break
    finally:
        forwarding.cancel()
    return ws


def create_app() -> web.Application:
    app = web.Application()
    app[ENGINE] = SyntheticEngine(Settings())
    app.router.add_post("/v1/sessions", create_session)
    app.router.add_post("/v1/sessions/{session_id}/jobs", create_job)
    app.router.add_get("/v1/sessions/{session_id}/events", session_events)
    app.router.add_get("/v1/ws", websocket)
    app.router.add_get("/readyz", ready)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
