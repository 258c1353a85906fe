"""The wire: one WebSocket or SSE connection that carries a session's events."""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from typing import Any, Protocol

import aiohttp

from shared.client.errors import (
    DRAINING,
    TokenbusError,
    _Draining,
    _Dropped,
    _http_error,
    _json_object,
    _retryable_status,
    _unauthorized,
)
from shared.client.model import EventDict, Position
from shared.close_codes import CLOSE_DRAINING, CLOSE_GOING_AWAY, CLOSE_UNAUTHORIZED
from shared.stream.position import Position as StreamPosition

logger = logging.getLogger("tokenbus.client")

#: Close codes of a gateway that stops on purpose: go elsewhere now, no backoff.
_GONE = (CLOSE_DRAINING, CLOSE_GOING_AWAY)


class _Link(Protocol):
    """One connection that carries a session's events."""

    async def receive(self) -> EventDict:
        """The next message; raises _Dropped (or a transient error) when the connection ends."""
        ...

    async def close(self) -> None: ...


def _is_connection_error(message: EventDict) -> bool:
    """An ``error`` about the connection itself (no offset, no job): not a session event."""
    return message.get("type") == "error" and "offset" not in message and not message.get("job_id")


class _WsLink:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    @classmethod
    async def open(
        cls,
        http: aiohttp.ClientSession,
        url: str,
        *,
        session_id: str,
        token: str,
        position: Position,
        heartbeat_s: float,
    ) -> _WsLink:
        try:
            ws = await http.ws_connect(url, heartbeat=heartbeat_s)
        except aiohttp.WSServerHandshakeError as exc:
            if 400 <= exc.status < 500 and not _retryable_status(exc.status):
                raise TokenbusError(
                    f"http_{exc.status}", f"WebSocket refused: {exc.message}", status=exc.status
                ) from exc
            raise
        link = cls(ws)
        try:
            epoch, offset = position
            connect: dict[str, Any] = {
                "type": "connect",
                "session_id": session_id,
                "token": token,
                "offset": offset,
            }
            if epoch is not None:
                connect["epoch"] = epoch
            await ws.send_str(json.dumps(connect))
            first = await link.receive()
            if first.get("type") != "connected":
                raise _Dropped(f"expected 'connected', got {first.get('type')!r}")
        except BaseException:
            await link.close()
            raise
        return link

    async def receive(self) -> EventDict:
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                message = _json_object(msg.data)
                if message is None or message.get("type") == "pong":
                    continue
                if _is_connection_error(message):
                    if message.get("code") == "unauthorized":
                        raise _unauthorized(message)
                    # Why the gateway is about to close: the close code says it too.
                    continue
                return message
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                code = self._ws.close_code
                if code == CLOSE_UNAUTHORIZED:
                    raise _unauthorized({})
                detail = f": {msg.extra}" if msg.extra else ""
                if msg.type is aiohttp.WSMsgType.ERROR:
                    detail = f": {msg.data!r}"
                gone = _Draining if code in _GONE else _Dropped
                raise gone(f"WebSocket closed ({code}){detail}")

    async def close(self) -> None:
        try:
            await self._ws.close()
        except Exception as exc:  # closing what is already gone
            logger.debug("closing the WebSocket failed: %r", exc)


class _SseLink:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""  # text not parsed yet, from self._pos on, line ends as "\n"
        self._pos = 0
        self._cr = False  # the last chunk ended with CR: maybe half of a CRLF
        self._data: list[str] = []
        self._notice = ""  # why the gateway ends the stream, when it says
        self._draining = False  # it said it is draining: go elsewhere at once

    @classmethod
    async def open(
        cls,
        http: aiohttp.ClientSession,
        url: str,
        *,
        token: str,
        position: Position,
        connect_timeout_s: float,
        idle_timeout_s: float,
    ) -> _SseLink:
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        epoch, offset = position
        if epoch is not None or offset:
            headers["Last-Event-ID"] = StreamPosition(epoch, offset).format()
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=idle_timeout_s
        )
        async with asyncio.timeout(connect_timeout_s):
            response = await http.get(url, headers=headers, timeout=timeout)
        if response.status != 200:
            try:
                error = await _http_error(response)
            finally:
                response.release()
            if response.status >= 500 or _retryable_status(response.status):
                raise _Dropped(str(error))
            raise error
        return cls(response)

    async def receive(self) -> EventDict:
        while True:
            event = self._next_event()
            if event is not None:
                if _is_connection_error(event):
                    # Why the gateway ends the stream (slow consumer, history unavailable).
                    self._notice = f" ({event.get('code')}: {event.get('message')})"
                    self._draining = event.get("code") == DRAINING
                    continue
                return event
            chunk = await self._response.content.readany()
            if not chunk:
                gone = _Draining if self._draining else _Dropped
                raise gone(f"event stream ended{self._notice}")
            self._feed(self._decoder.decode(chunk))

    def _feed(self, text: str) -> None:
        """Append text with its line ends (CRLF, CR or LF) made LF."""
        if self._cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across chunks
        self._cr = text.endswith("\r")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        self._buffer = self._buffer[self._pos :] + text
        self._pos = 0

    def _next_event(self) -> EventDict | None:
        """Parse whole lines from the buffer; an event when a blank line completes one."""
        while True:
            cut = self._buffer.find("\n", self._pos)
            if cut < 0:
                return None  # no whole line yet
            line = self._buffer[self._pos : cut]
            self._pos = cut + 1
            if not line:
                data, self._data = self._data, []
                if data:
                    event = _json_object("\n".join(data))
                    if event is not None:
                        return event
                continue
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
            # id (the event carries its epoch and offset), retry, comments: nothing to do.

    async def close(self) -> None:
        self._response.close()
