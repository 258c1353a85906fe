"""A lean pipelined Redis connection for the hot paths: commands out in one write, replies in
order, parsed by hiredis; no pool, no per-command task or timer.

Why not redis-py for these: measured on this project's 2-core machine, a round trip through a
redis.asyncio pipeline costs ~125 us of CPU (pool checkout and release, command packing,
``asyncio.timeout``, event dispatch, reply parsing) against ~41 us for the same two commands
written and read here; a busy worker makes thousands of round trips a second. redis-py stays
the client for everything else (blocking reads, pub/sub, admin, tests).

Replies are hiredis's RESP2 values, as redis-py returns them without response callbacks:
bytes, ints, lists, None; an error reply becomes redis-py's own exception for it
(``NoScriptError``, ``ResponseError``, ...), in the caller's future only. A lost connection
fails every command in flight with ``redis.exceptions.ConnectionError``; no reply within
``timeout_s`` closes the connection with ``TimeoutError``. The next send connects again.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

Command = Sequence[EncodableT]


def _reply(value: Any) -> Any:
    """hiredis's error objects, at any depth (EXEC's array), as redis-py's exceptions."""
    kind = type(value)
    if kind is list:
        for v in value:
            if type(v) is list or isinstance(v, hiredis.ReplyError):
                return [_reply(v) for v in value]
        return value
    if kind is not bytes and isinstance(value, hiredis.ReplyError):
        return BaseParser.parse_error(str(value))  # type: ignore[no-untyped-call]
    return value


class _Protocol(asyncio.Protocol):
    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self._reader = hiredis.Reader()
        self.transport: asyncio.WriteTransport | None = None
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have what is used here.
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                value = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis sent an unreadable reply: {exc}"))
                return
            if value is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("Redis sent a reply nobody was waiting for"))
                return
            future, _ = waiting.popleft()
            if not future.done():  # its caller may have given up
                reply = _reply(value)
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        """Close the connection and fail every command still waiting for its reply."""
        self._wire._forget(self)
        if not self.lost.done():
            self.lost.set_result(None)
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Wire:
    """One connection to ``url``, opened on first use and again after it is lost."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, connect_timeout_s: float = 5.0) -> None:
        self._url = url
        self._options = parse_url(url)
        self.timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watch: asyncio.TimerHandle | None = None

    async def execute(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Send ``commands`` in one write; one future per reply, in order. Raises
        ConnectionError when no connection could be made (nothing was sent)."""
        proto = self._proto or await self._connect()
        transport = proto.transport
        assert transport is not None
        # Packed first: a value hiredis refuses raises here, before anything waits for a reply.
        packed = b"".join(hiredis.pack_command(tuple(c)) for c in commands)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout_s
        futures = []
        for _ in commands:
            future: asyncio.Future[Any] = loop.create_future()
            proto.waiting.append((future, deadline))
            futures.append(future)
        transport.write(packed)
        if self._watch is None:
            self._watch = loop.call_later(self.timeout_s, self._check)
        return futures

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        proto = self._proto
        if proto is not None:
            proto.fail(RedisConnectionError("Connection to Redis closed"))
            await proto.lost

    def _forget(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    def _check(self) -> None:
        """Every ``timeout_s`` while commands wait: a reply overdue means Redis is stuck or
        gone; close the connection so its callers learn it (and the next send reconnects)."""
        self._watch = None
        proto = self._proto
        if proto is None or not proto.waiting:
            return
        _, deadline = proto.waiting[0]
        if deadline <= time.monotonic():
            proto.fail(RedisTimeoutError(f"no reply from Redis in {self.timeout_s:g} s"))
            return
        self._watch = asyncio.get_running_loop().call_later(self.timeout_s, self._check)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        o = self._options
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if "path" in o:
                    _, proto = await loop.create_unix_connection(lambda: _Protocol(self), o["path"])
                else:
                    context = (
                        ssl.create_default_context() if self._url.startswith("rediss:") else None
                    )
                    _, proto = await loop.create_connection(
                        lambda: _Protocol(self),
                        o.get("host", "localhost"),
                        o.get("port", 6379),
                        ssl=context,
                    )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {self._url}: {exc}") from exc
        self._proto = proto
        hello: list[Command] = []
        if o.get("password"):
            user = o.get("username")
            hello.append(("AUTH", user, o["password"]) if user else ("AUTH", o["password"]))
        if o.get("db"):
            hello.append(("SELECT", o["db"]))
        if hello:
            for future in await self.execute(hello):
                await future
        return proto
