"""WebSocket ``/v1/ws``: an explicit state machine, AWAIT_CONNECT -> CONNECTED -> CLOSED.

Client messages are JSON objects with a ``type`` (``prompt``, ``cancel``, ``ping``); the first
one is ``{"session_id": ..., "connect": true}`` (token in it, or in the URL's query). Everything
the server sends goes through the client's outbox, so one task writes, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import weakref
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from gateway.direct_write import ws_writer
from gateway.errors import ApiError, error_event, validated
from gateway.outbox import SLOW_CONSUMER, STALLED, ClientStalled, write_within
from gateway.requests import PromptRequest
from gateway.state import GATEWAY, Gateway, bearer
from gateway.subscription import SessionSubscription
from shared.close_codes import (
    CLOSE_DRAINING,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
)
from shared.codec import BadJson, parse_json
from shared.jobs import get_record, request_cancel
from shared.logs import log
from shared.protocol import TERMINAL_TYPES, EventDict, Text
from shared.stream.position import MAX_OFFSET, Position

logger = logging.getLogger("tokenbus.gateway.ws")

#: Most messages written back to back before the write loop looks at its queue again.
_BATCH = 64


class State(enum.Enum):
    AWAIT_CONNECT = "await_connect"
    CONNECTED = "connected"
    CLOSED = "closed"


class ConnectMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Any text: one no token was signed for gets 4401, as a wrong token does.
    session_id: str | None = Field(None, min_length=1, max_length=128)
    token: str | None = None
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Last offset the client saw.")
    epoch: Text | None = Field(None, max_length=128)


class CancelMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    job_id: Text | None = Field(None, max_length=128)


class Connection:
    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.gw = gw
        self.ws = ws
        self.request = request
        self.state = State.AWAIT_CONNECT
        self.outbox = gw.outbox()
        self.metrics = gw.metrics.client("ws")
        self.session_id: str | None = None
        self.subscription: SessionSubscription | None = None
        self.jobs: dict[str, str] = {}  # job id -> disconnect policy, until its terminal event
        self._writer: asyncio.Task[None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        self.outbox.put(message)

    async def run(self) -> None:
        self._writer = asyncio.create_task(self._write_loop())
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        await self._on_text(msg.data)
                    except RedisError as exc:  # an outage fails this message, not the socket
                        log(logger, "ws_redis_error", logging.WARNING, error=str(exc))
                        self.send(
                            error_event("redis_unavailable", "the broker is unreachable; retry")
                        )
                elif msg.type == WSMsgType.BINARY:
                    self.send(
                        error_event("bad_frame", "binary frames are not accepted; send JSON text")
                    )
                else:
                    break
                if self.state is State.CLOSED:
                    break
        finally:
            await self._cleanup()

    async def _on_text(self, data: str) -> None:
        try:
            message = parse_json(data)
        except BadJson as exc:
            self.send(error_event("bad_json", f"message is not JSON: {exc}"))
            return
        if not isinstance(message, dict):
            self.send(error_event("bad_message", "message must be a JSON object"))
            return
        kind = message.get("type")
        if message.get("connect") is True or kind == "connect":
            await self._on_connect(message)
        elif kind == "ping":
            self.send({"type": "pong", **({"t": message["t"]} if "t" in message else {})})
        elif self.state is not State.CONNECTED:
            self.send(
                error_event("not_connected", "send {'session_id': ..., 'connect': true} first")
            )
        elif kind == "prompt":
            await self._on_prompt(message)
        elif kind == "cancel":
            await self._on_cancel(message)
        else:
            self.send(
                error_event(
                    "unknown_type",
                    f"unknown message type {kind!r}; expected connect, prompt, cancel or ping",
                )
            )

    async def _on_connect(self, message: dict[str, Any]) -> None:
        if self.state is State.CONNECTED:
            self.send(error_event("already_connected", "this connection already follows a session"))
            return
        try:
            connect = validated(ConnectMessage, message)
        except ApiError as exc:
            self.send(exc.event())
            return
        session_id = connect.session_id or self.request.query.get("session_id")
        if not session_id:
            self.send(error_event("invalid_request", "session_id is required"))
            return
        try:
            self.gw.authorize(session_id, connect.token or bearer(self.request))
        except ApiError as exc:
            self.send(exc.event())
            log(logger, "ws_refused", logging.WARNING, session=session_id, code=exc.code)
            await self._close(CLOSE_UNAUTHORIZED, exc.message)
            return
        self.session_id = session_id
        self.state = State.CONNECTED
        self.send(
            {
                "type": "connected",
                "session_id": session_id,
                "epoch": connect.epoch,
                "offset": connect.offset,
            }
        )
        self.subscription = self.gw.subscription(
            session_id,
            self.outbox,
            Position(connect.epoch, connect.offset),
            listener=self._on_event,
        )
        try:
            await self.subscription.start()
        except Exception as exc:
            log(logger, "ws_subscribe_failed", logging.WARNING, session=session_id, error=str(exc))
            self.send(
                error_event("unavailable", "could not follow the session; reconnect to resume")
            )
            await self._close(CLOSE_UNAVAILABLE, "unavailable")
            return
        self.metrics.opened()
        log(logger, "ws_connected", session=session_id, epoch=connect.epoch, offset=connect.offset)

    async def _on_prompt(self, message: dict[str, Any]) -> None:
        assert self.session_id is not None
        ref = message.pop("ref", None)
        echo = {"ref": ref} if ref is not None else {}
        try:
            request = validated(PromptRequest, message)
            done = await self.gw.intake.accept(self.session_id, request)
        except ApiError as exc:
            self.send({**exc.event(), **echo})
            return
        job = done.job
        self.jobs[job.id] = job.on_disconnect
        # A repeat of an earlier prompt's idempotency_key: the same job, nothing enqueued.
        replayed = {"replayed": True} if done.replayed else {}
        self.send({"type": "queued", "job_id": job.id, "model": job.model, **replayed, **echo})

    async def _on_cancel(self, message: dict[str, Any]) -> None:
        assert self.session_id is not None
        try:
            cancel = validated(CancelMessage, message)
        except ApiError as exc:
            self.send(exc.event())
            return
        targets = [cancel.job_id] if cancel.job_id else list(self.jobs)
        for job_id in targets:
            record = await get_record(self.gw.redis, self.gw.keys, job_id)
            if record.get("session_id") != self.session_id:
                self.send(error_event("job_not_found", f"no job {job_id!r} on this session"))
                continue
            await self._cancel(job_id, "client")
            self.send({"type": "cancelling", "job_id": job_id})

    async def _cancel(self, job_id: str, reason: str) -> None:
        await request_cancel(
            self.gw.redis, self.gw.keys, job_id, reason=reason, ttl_s=self.gw.settings.job_ttl_s
        )

    def _on_event(self, event: EventDict) -> None:
        if event.get("type") in TERMINAL_TYPES:
            self.jobs.pop(str(event.get("job_id")), None)

    async def _write_loop(self) -> None:
        stall_s = self.gw.settings.client_stall_s
        transport = self.request.transport
        # While this loop is parked, what is put in the outbox is written at once.
        self.outbox.direct = ws_writer(
            self.ws, transport, self.metrics.written_directly, self.gw.ticks
        )
        try:
            await self._write_queued(stall_s, transport)
        finally:
            self.outbox.detach_direct()

    async def _write_queued(self, stall_s: float, transport: asyncio.Transport | None) -> None:
        while True:
            item = await self.outbox.get()
            if item is None:
                break
            # What is ready goes out back to back, each message as it was published.
            batch = [item, *self.outbox.take_ready(_BATCH)]
            sent = 0
            try:
                for out in batch:
                    data = out.text()
                    # At most 4 bytes a character in UTF-8; cut by _drop, which logs why first.
                    send = self.ws.send_str(data)
                    await write_within(send, stall_s, transport, 4 * len(data), abort=False)
                    sent += 1
            except ClientStalled:
                await self._drop(STALLED)
                return
            finally:
                self.metrics.written(out.event for out in batch[:sent])
        reason = self.outbox.closed
        if reason == SLOW_CONSUMER:
            await self._drop(reason)
        elif reason is not None and reason != "closing":
            await self._close(CLOSE_UNAVAILABLE, reason)

    async def _drop(self, reason: str) -> None:
        """Drop a client too slow to keep: 4008 (resume from your offset) if the close frame
        can still get through to it, else cut the connection."""
        self.metrics.dropped_slow()
        log(logger, "ws_dropped", logging.WARNING, session=self.session_id, reason=reason)
        self.state = State.CLOSED
        transport = self.request.transport
        if reason == STALLED:
            # Its buffers are full: a close frame would only wait behind them.
            if transport is not None:
                transport.abort()
            return
        message = b"slow consumer: resume from your last offset"
        close = self.ws.close(code=CLOSE_SLOW_CONSUMER, message=message)
        with contextlib.suppress(ClientStalled):
            await write_within(close, self.gw.settings.client_stall_s, transport, len(message))

    async def _close(self, code: int, message: str) -> None:
        self.state = State.CLOSED
        # Let what is queued (the error explaining why) go out first.
        if self._writer is not None and asyncio.current_task() is not self._writer:
            self.outbox.close("closing")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), 1.0)
        await self.ws.close(code=code, message=message.encode()[:120])

    async def _cleanup(self) -> None:
        self.state = State.CLOSED
        self.metrics.closed()
        if self.subscription is not None:
            self.subscription.close()
        self.outbox.close("closing")
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer
        for job_id, policy in self.jobs.items():
            if policy == "cancel":
                await self._cancel(job_id, "disconnect")
        log(
            logger,
            "ws_closed",
            session=self.session_id,
            offset=self.subscription.offset if self.subscription else None,
        )


#: Open WebSockets of an app, closed when it shuts down.
SOCKETS = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])


async def websocket(request: web.Request) -> web.WebSocketResponse:
    gw = request.app[GATEWAY]
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=gw.settings.max_message_bytes)
    await ws.prepare(request)
    sockets = request.app[SOCKETS]
    sockets.add(ws)
    try:
        await Connection(gw, ws, request).run()
    finally:
        sockets.discard(ws)
    return ws


async def close_all(app: web.Application) -> None:
    """On a drain or shutdown: tell every client to go elsewhere now (CLOSE_DRAINING), not at the
    grace period's end; each resumes from its last offset on another gateway."""
    open_sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
    sockets = list(open_sockets)
    if sockets:
        log(logger, "ws_closing_all", count=len(sockets))
    message = b"gateway draining: reconnect and resume"
    await asyncio.gather(
        *(ws.close(code=CLOSE_DRAINING, message=message) for ws in sockets),
        return_exceptions=True,
    )


def add_routes(app: web.Application) -> None:
    app[SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(close_all)
    app.router.add_get("/v1/ws", websocket)
