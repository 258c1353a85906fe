"""Answers to OpenAI requests from a job's events: a chunk stream (SSE) or one JSON object.

A stream holds its status line back until the answer's first text, its end, or the first
keep-alive, whichever comes first: an error before any output (a prompt over the context
length, say) is then a real HTTP status the client raises on. After that, an error goes out as
vLLM's server sends it, ``data: {"error": {...}}`` then ``data: [DONE]``; the ``openai`` client
raises ``APIError`` on it.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import ApiError, job_error
from gateway.openai_format import DONE, KEEPALIVE, JsonObject, Reply, frame, usage_of
from gateway.openai_jobs import JobRun
from gateway.outbox import STALLED, ClientStalled, write_within
from gateway.sse import HEADERS
from gateway.state import GATEWAY


class _HeldStream:
    """An SSE response that keeps what it is given until told to commit."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={**HEADERS, **headers})
        self.stall_s = request.app[GATEWAY].settings.client_stall_s
        self._held: list[bytes] = []

    @property
    def committed(self) -> bool:
        return self.response.prepared

    def hold(self, data: bytes) -> None:
        self._held.append(data)

    async def send(self, *frames: bytes) -> None:
        if not self.committed:
            await self.response.prepare(self.request)
        data, self._held = b"".join((*self._held, *frames)), []
        await write_within(
            self.response.write(data), self.stall_s, self.request.transport, len(data)
        )


async def stream(request: web.Request, run: JobRun, reply: Reply) -> web.StreamResponse:
    out = _HeldStream(request, run.headers())
    try:
        try:
            await _pump(out, run, reply)
        except ApiError as exc:
            if not out.committed:
                return exc.response(run.headers())
            await out.send(frame(exc.body()), DONE)
    except ClientStalled:  # it stopped reading: cut off, and the job cancelled on the way out
        run.failure = STALLED
    except ConnectionError:  # the client left: the job is cancelled on the way out
        run.failure = "disconnected"
    return out.response


async def _pump(out: _HeldStream, run: JobRun, reply: Reply) -> None:
    keepalive_s = run.gw.settings.keepalive_s
    opened = False
    while True:
        event = await run.next_event(keepalive_s)
        if event is None:
            await out.send(KEEPALIVE)
            continue
        kind = event["type"]
        if kind == "error":
            raise job_error(str(event.get("code")), str(event.get("message")))
        # A job cancelled before it started, or continued by another worker after one died,
        # has no (second) stream_start: the opening chunk goes out once regardless.
        if not opened:
            opened = True
            opening = reply.opening()
            if opening is not None:
                out.hold(frame(opening))
        if kind == "delta" and event.get("delta"):
            await out.send(frame(reply.delta(event["delta"])))
        elif kind == "stream_end":
            frames = [frame(reply.finish(event["finish_reason"]))]
            if reply.include_usage:
                frames.append(frame(reply.usage(usage_of(event))))
            await out.send(*frames, DONE)
            return


async def collect(run: JobRun, reply: Reply) -> JsonObject:
    """The whole answer as one response object; ApiError when the job failed."""
    parts: list[str] = []
    while True:
        event = await run.next_event(run.gw.settings.keepalive_s)
        if event is None:
            continue
        kind = event["type"]
        if kind == "delta":
            parts.append(event["delta"])
        elif kind == "stream_end":
            return reply.whole("".join(parts), event["finish_reason"], usage_of(event))
        elif kind == "error":
            raise job_error(str(event.get("code")), str(event.get("message")))
