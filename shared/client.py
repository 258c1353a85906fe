"""An async Python client for tokenbus: sessions, jobs, and event streams that survive drops.

    async with Client("http://127.0.0.1:8000") as client:
        chat = await client.session()
        async for text in chat.ask("What is the capital of France?"):
            print(text, end="", flush=True)

Events arrive over a WebSocket (``transport="ws"``, the default) or Server-Sent Events
(``"sse"``). Each stream remembers the last ``(epoch, offset)`` it delivered; when its connection
drops (a gateway restart, a slow-consumer close, a network error) it reconnects with backoff and
resumes from there, so the caller sees every event once, in order. A ``resync`` event (history
lost) is yielded by ``events()``; ``ask()`` raises ``ResyncError`` instead, since its text would
have a gap.

This module needs aiohttp and the standard library only: no gateway or worker code.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, TypeAlias

import aiohttp

from shared.close_codes import CLOSE_UNAUTHORIZED

__all__ = [
    "Answer",
    "AnswerStream",
    "Client",
    "ConnectionLostError",
    "EventDict",
    "Position",
    "ResyncError",
    "Session",
    "TokenbusError",
    "Transport",
    "Usage",
]

logger = logging.getLogger("tokenbus.client")

Transport: TypeAlias = Literal["ws", "sse"]
#: A session event as the gateway sends it: a JSON object with ``type``, ``epoch``, ``offset``.
EventDict: TypeAlias = dict[str, Any]
#: A place in a session's event stream: ``(epoch, offset)`` of the last event seen.
Position: TypeAlias = tuple[str | None, int]

START: Position = (None, 0)

#: Jobs whose pre-send position ``Session.stream`` remembers.
_REMEMBERED_JOBS = 1024
#: A link that stayed up this long before it dropped was healthy, even with nothing to deliver.
_HEALTHY_LINK_S = 5.0
#: Failures that a new connection (or a retried request) may fix.
_TRANSIENT = (aiohttp.ClientError, OSError, TimeoutError)


class TokenbusError(Exception):
    """An error the gateway reported: an HTTP error response or an ``error`` event.

    ``status`` is the HTTP status (None for an event); ``job_id`` is set when a job failed.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        job_id: str | None = None,
    ) -> None:
        where = f"HTTP {status} " if status is not None else ""
        super().__init__(f"{where}{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.job_id = job_id


class ResyncError(TokenbusError):
    """The session's history no longer holds events this answer needs: its text has a gap."""

    def __init__(self, event: EventDict, job_id: str | None) -> None:
        self.reason = str(event.get("reason", "unknown"))
        super().__init__(
            "resync",
            f"session history lost ({self.reason}); the answer has a gap",
            job_id=job_id,
        )
        self.event = event


class ConnectionLostError(TokenbusError):
    """No connection to the gateway could be made within ``reconnect_timeout_s``."""

    def __init__(self, message: str) -> None:
        super().__init__("connection_lost", message)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, value: object) -> Usage:
        if not isinstance(value, Mapping):
            return cls()
        return cls(
            prompt_tokens=int(value.get("prompt_tokens", 0)),
            completion_tokens=int(value.get("completion_tokens", 0)),
            total_tokens=int(value.get("total_tokens", 0)),
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished job: all its text, why it stopped (stop, length, cancelled) and its usage."""

    job_id: str
    text: str
    finish_reason: str
    usage: Usage
    model: str | None = None


class _Dropped(Exception):
    """The connection ended in a way that reconnecting and resuming fixes."""


class _Link(Protocol):
    """One connection that carries a session's events."""

    async def receive(self) -> EventDict:
        """The next message; raises _Dropped (or a transient error) when the connection ends."""
        ...

    async def close(self) -> None: ...


def _json_object(text: str | bytes) -> EventDict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_connection_error(message: EventDict) -> bool:
    """An ``error`` about the connection itself (no offset, no job): not a session event."""
    return message.get("type") == "error" and "offset" not in message and not message.get("job_id")


def _unauthorized(message: EventDict) -> TokenbusError:
    return TokenbusError(
        str(message.get("code", "unauthorized")),
        str(message.get("message", "missing or wrong session token")),
        status=401,
    )


async def _http_error(response: aiohttp.ClientResponse) -> TokenbusError:
    """The gateway's ``{"error": {...}}`` body (or whatever came) as a TokenbusError."""
    body = await response.read()
    error = (_json_object(body) or {}).get("error")
    if isinstance(error, Mapping):
        return TokenbusError(
            str(error.get("code") or f"http_{response.status}"),
            str(error.get("message") or response.reason or ""),
            status=response.status,
            type=error.get("type") if isinstance(error.get("type"), str) else None,
            param=error.get("param") if isinstance(error.get("param"), str) else None,
        )
    text = body.decode(errors="replace").strip()[:200]
    return TokenbusError(
        f"http_{response.status}", text or response.reason or "", status=response.status
    )


def _retryable_status(status: int) -> bool:
    """A status a gateway restarting behind a proxy, or a busy one, answers for a while."""
    return status in (429, 502, 503, 504)


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
                raise _Dropped(f"WebSocket closed ({code}){detail}")

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
            headers["Last-Event-ID"] = f"{epoch}:{offset}" if epoch is not None else str(offset)
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
                    continue
                return event
            chunk = await self._response.content.readany()
            if not chunk:
                raise _Dropped(f"event stream ended{self._notice}")
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


class _EventStream:
    """One resumable subscription to a session: connects, reconnects, resumes, drops duplicates."""

    def __init__(self, session: Session, position: Position) -> None:
        self._session = session
        self.epoch, self.offset = position
        self._link: _Link | None = None
        self._backoff = 0.0  # before the next connection attempt; 0 after a healthy link
        self._stalled_since: float | None = None  # first drop since an event was delivered
        self._opened_at = 0.0
        self.reconnects = 0

    async def connect(self) -> None:
        await self._connect(None)

    async def next(self) -> EventDict:
        """The next session event after this stream's position; reconnects as needed."""
        while True:
            if self._link is None:
                await self._connect("not connected")
            assert self._link is not None
            try:
                event = await self._link.receive()
            except (_Dropped, *_TRANSIENT) as exc:
                logger.debug("session %s: connection lost: %r", self._session.session_id, exc)
                await self.close()
                now = asyncio.get_running_loop().time()
                if now - self._opened_at >= _HEALTHY_LINK_S:
                    self._backoff, self._stalled_since = 0.0, None
                if self._stalled_since is None:
                    self._stalled_since = now
                await self._connect(str(exc) or type(exc).__name__)
                continue
            if self._accept(event):
                self._backoff = 0.0
                self._stalled_since = None
                return event

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    def _accept(self, event: EventDict) -> bool:
        offset, epoch = event.get("offset"), event.get("epoch")
        if not isinstance(offset, int) or isinstance(offset, bool):
            return False  # not a session event
        epoch = epoch if isinstance(epoch, str) else None
        resync = event.get("type") == "resync"
        if not resync and epoch == self.epoch and offset <= self.offset:
            return False  # delivered already
        self.epoch, self.offset = epoch, offset
        self._session._observe(epoch, offset, resync=resync)
        return True

    def _grow_backoff(self) -> None:
        client = self._session.client
        self._backoff = min(max(self._backoff * 2, client.backoff_s), client.max_backoff_s)

    async def _connect(self, reason: str | None) -> None:
        """Open a link from this stream's position; ``reason`` is why the last one dropped.

        Gives up (ConnectionLostError) when ``reconnect_timeout_s`` passed since the stream last
        made progress: since the drop, or since the first of several drops in a row with no
        event delivered between them (a gateway that keeps dropping the stream at once).
        """
        client = self._session.client
        loop = asyncio.get_running_loop()
        since = loop.time() if self._stalled_since is None else self._stalled_since
        deadline = since + client.reconnect_timeout_s
        attempts = 0
        failure = reason
        while True:
            if self._backoff:
                if loop.time() + self._backoff > deadline:
                    message = (
                        f"no progress from the gateway at {client.base_url} for "
                        f"{client.reconnect_timeout_s:g} s; last failure: {failure}"
                    )
                    logger.warning("session %s: %s", self._session.session_id, message)
                    raise ConnectionLostError(message)
                await asyncio.sleep(self._backoff)
            attempts += 1
            try:
                self._link = await self._session._open_link((self.epoch, self.offset))
            except (_Dropped, *_TRANSIENT) as exc:
                logger.debug("session %s: connecting failed: %r", self._session.session_id, exc)
                failure = str(exc) or type(exc).__name__
                self._grow_backoff()
                continue
            break
        self._opened_at = loop.time()
        # Reset only once the link delivers an event: one that keeps dropping at once backs off.
        self._grow_backoff()
        if reason is not None:
            self.reconnects += 1
            self._session.reconnects += 1
            logger.info(
                "session %s: reconnected over %s after %d attempt(s) (%s); resuming after %s:%d",
                self._session.session_id,
                self._session.transport,
                attempts,
                reason,
                self.epoch,
                self.offset,
            )


def _starts_job(event: EventDict) -> bool:
    """Whether ``event`` can be a job's first: nothing of its text can come before it."""
    kind = event.get("type")
    if kind in ("stream_start", "error"):
        return True
    return kind == "stream_end" and Usage.of(event.get("usage")).completion_tokens == 0


class AnswerStream:
    """The answer to one job: ``async for`` its text as it comes, or ``await .text()``.

    Nothing happens until it is iterated. ``job_id`` is known once iteration started; ``answer``
    once the job ended. A failed job raises TokenbusError; lost history raises ResyncError.
    """

    def __init__(
        self,
        session: Session,
        *,
        body: dict[str, Any] | None = None,
        job_id: str | None = None,
        start: Position | None = None,
    ) -> None:
        self._session = session
        self._body = body
        self._start = start
        self.job_id = job_id
        self.model: str | None = None
        self.answer: Answer | None = None
        self._parts: list[str] = []
        self._stream: _EventStream | None = None
        self._gen: AsyncGenerator[str, None] | None = None
        self._error: BaseException | None = None

    @property
    def reconnects(self) -> int:
        return self._stream.reconnects if self._stream is not None else 0

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> str:
        if self._error is not None:
            raise self._error
        if self._gen is None:
            self._gen = self._run()
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            self._error = exc
            raise

    async def text(self) -> Answer:
        """Wait for the end of the job; the whole answer (text already iterated included)."""
        async for _ in self:
            pass
        assert self.answer is not None
        return self.answer

    async def cancel(self) -> None:
        """Ask the gateway to stop this job; the stream then ends with ``cancelled``."""
        if self.job_id is None:
            raise RuntimeError("the job is not sent yet: iterate the stream first")
        await self._session.cancel(self.job_id)

    async def aclose(self) -> None:
        """Stop following the job (it keeps running: see ``cancel``)."""
        if self._gen is not None:
            await self._gen.aclose()

    async def __aenter__(self) -> AnswerStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[str, None]:
        session = self._session
        start = session.position if self._start is None else self._start
        self._stream = stream = _EventStream(session, start)
        try:
            # Subscribed from a position before the job exists: none of its events is missed.
            await stream.connect()
            if self._body is not None:
                self.job_id = await session._submit(self._body, start)
            lost: EventDict | None = None  # a resync before this job's first event
            seen = False
            while True:
                event = await stream.next()
                kind = event.get("type")
                if kind == "resync":
                    if seen:
                        raise ResyncError(event, self.job_id)
                    lost = event
                    continue
                if event.get("job_id") != self.job_id:
                    continue
                if not seen:
                    seen = True
                    if lost is not None and not _starts_job(event):
                        raise ResyncError(lost, self.job_id)
                if kind == "stream_start":
                    self.model = event.get("model") or self.model
                elif kind == "delta":
                    text = event.get("delta")
                    if isinstance(text, str) and text:
                        self._parts.append(text)
                        yield text
                elif kind == "stream_end":
                    self.answer = Answer(
                        job_id=self.job_id or "",
                        text="".join(self._parts),
                        finish_reason=str(event.get("finish_reason")),
                        usage=Usage.of(event.get("usage")),
                        model=self.model,
                    )
                    return
                elif kind == "error":
                    raise TokenbusError(
                        str(event.get("code", "error")),
                        str(event.get("message", "")),
                        job_id=self.job_id,
                    )
        finally:
            await stream.close()


def _job_body(
    content: str | None,
    messages: list[dict[str, str]] | None,
    prompt: str | None,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    given = sum(x is not None for x in (content, messages, prompt))
    if given != 1:
        raise TypeError("give exactly one of: a message text, messages=[...] or prompt=...")
    body: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = (
            messages if messages is not None else [{"role": "user", "content": content}]
        )
    return body


class Session:
    """One tokenbus session: a conversation the server remembers, and its event stream."""

    def __init__(
        self,
        client: Client,
        session_id: str,
        token: str,
        *,
        transport: Transport,
        position: Position = START,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.token = token
        self.transport: Transport = transport
        #: Connections this session's streams re-established after a drop.
        self.reconnects = 0
        self._epoch, self._offset = position
        self._sent: OrderedDict[str, Position] = OrderedDict()

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, transport={self.transport!r})"

    @property
    def position(self) -> Position:
        """``(epoch, offset)`` of the newest event any stream of this session delivered."""
        return self._epoch, self._offset

    async def send(
        self,
        content: str | None = None,
        /,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        **params: Any,
    ) -> str:
        """Enqueue a job; its id. ``content`` is a user message (the session remembers earlier
        turns); ``prompt=`` is a raw completion instead. ``params`` go into the job body as they
        are: max_tokens, temperature, top_p, seed, stop, model, memory, timeout_s, ...
        """
        return await self._submit(_job_body(content, messages, prompt, params), self.position)

    def ask(
        self,
        content: str | None = None,
        /,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        **params: Any,
    ) -> AnswerStream:
        """Send a job and follow its answer: ``async for text in chat.ask(...)`` yields its text
        as it comes; ``await chat.ask(...).text()`` waits for the whole Answer. Same arguments
        as ``send``.
        """
        return AnswerStream(self, body=_job_body(content, messages, prompt, params))

    def stream(self, job_id: str) -> AnswerStream:
        """Follow a job sent earlier (by ``send``, or by anyone: then from the retained history)."""
        return AnswerStream(self, job_id=job_id, start=self._sent.get(job_id, START))

    async def cancel(self, job_id: str) -> str:
        """Ask the gateway to stop a job; its state (``cancelling``, or the one it ended in)."""
        reply = await self.client._request(
            "DELETE", f"{self._jobs_path}/{job_id}", token=self.token, idempotent=True
        )
        return str(reply.get("state", ""))

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job's record: state, attempts, worker, timestamps..."""
        return await self.client._request(
            "GET", f"{self._jobs_path}/{job_id}", token=self.token, idempotent=True
        )

    async def events(self, *, after: Position | None = None) -> AsyncIterator[EventDict]:
        """Every event of the session after ``after`` (default: this session's position; use
        ``(None, 0)`` for all the history the server keeps), forever, in order, once each.
        """
        stream = _EventStream(self, self.position if after is None else after)
        try:
            await stream.connect()
            while True:
                yield await stream.next()
        finally:
            await stream.close()

    @property
    def _jobs_path(self) -> str:
        return f"/v1/sessions/{self.session_id}/jobs"

    async def _submit(self, body: dict[str, Any], position: Position) -> str:
        reply = await self.client._request(
            "POST", self._jobs_path, token=self.token, json_body=body, idempotent=False
        )
        job_id = str(reply["job_id"])
        self._sent[job_id] = position
        while len(self._sent) > _REMEMBERED_JOBS:
            self._sent.popitem(last=False)
        return job_id

    def _observe(self, epoch: str | None, offset: int, *, resync: bool) -> None:
        if epoch == self._epoch:
            self._offset = max(self._offset, offset)
        elif resync or self._epoch is None:
            self._epoch, self._offset = epoch, offset

    async def _open_link(self, position: Position) -> _Link:
        client = self.client
        http = client._http_session()
        if self.transport == "ws":
            async with asyncio.timeout(client.timeout_s):
                return await _WsLink.open(
                    http,
                    client._ws_base + "/v1/ws",
                    session_id=self.session_id,
                    token=self.token,
                    position=position,
                    heartbeat_s=client.idle_timeout_s / 3,
                )
        return await _SseLink.open(
            http,
            f"{client.base_url}/v1/sessions/{self.session_id}/events",
            token=self.token,
            position=position,
            connect_timeout_s=client.timeout_s,
            idle_timeout_s=client.idle_timeout_s,
        )


class Client:
    """Entry point: ``async with Client(base_url) as client: chat = await client.session()``.

    ``api_key`` is sent as a Bearer token when creating sessions (a gateway with API keys set
    needs one). Streams reconnect for up to ``reconnect_timeout_s`` after each drop, waiting
    ``backoff_s`` doubling to ``max_backoff_s`` between attempts; ``timeout_s`` bounds each
    request and connection attempt; a stream silent for ``idle_timeout_s`` counts as dropped.
    Pass ``http`` to use an aiohttp session of your own (it is not closed here).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        transport: Transport = "ws",
        reconnect_timeout_s: float = 30.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        timeout_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        if transport not in ("ws", "sse"):
            raise ValueError(f"transport must be 'ws' or 'sse', not {transport!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.transport: Transport = transport
        self.reconnect_timeout_s = reconnect_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._http = http
        self._owns_http = http is None

    async def __aenter__(self) -> Client:
        self._http_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def session(
        self,
        session_id: str | None = None,
        token: str | None = None,
        *,
        transport: Transport | None = None,
        after: Position = START,
    ) -> Session:
        """A new session, or (with ``session_id`` and ``token``) one created before, whose
        streams start after ``after`` (default: all the history the server keeps).
        """
        transport = transport or self.transport
        if session_id is not None or token is not None:
            if not session_id or not token:
                raise TypeError("reopening a session needs both session_id and token")
            return Session(self, session_id, token, transport=transport, position=after)
        reply = await self._request("POST", "/v1/sessions", token=self.api_key, idempotent=True)
        return Session(self, str(reply["session_id"]), str(reply["token"]), transport=transport)

    @property
    def _ws_base(self) -> str:
        base = self.base_url
        return "ws" + base[4:] if base.startswith("http") else base

    def _http_session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
            )
            self._owns_http = True
        return self._http

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        idempotent: bool,
        json_body: object = None,
    ) -> dict[str, Any]:
        """One JSON request. Retried, within ``reconnect_timeout_s``, when it surely did not
        reach the gateway (connection refused), or at all for an ``idempotent`` one.
        """
        http = self._http_session()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        retryable: tuple[type[BaseException], ...] = (
            _TRANSIENT if idempotent else (aiohttp.ClientConnectorError,)
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout_s
        backoff = self.backoff_s
        while True:
            try:
                async with http.request(
                    method,
                    self.base_url + path,
                    json=json_body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as response:
                    if response.status >= 400:
                        raise await _http_error(response)
                    reply = _json_object(await response.read())
                    return reply if reply is not None else {}
            except retryable as exc:
                if loop.time() + backoff > deadline:
                    raise ConnectionLostError(
                        f"{method} {path} failed for {self.reconnect_timeout_s:g} s: {exc!r}"
                    ) from exc
                logger.debug("%s %s failed (%r); retrying", method, path, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
