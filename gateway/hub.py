"""One Redis pub/sub connection per gateway process, multiplexing every session channel.

Channels are reference-counted: the first subscriber of a channel subscribes it, the last one
to leave unsubscribes it. ``attach`` returns only once Redis has confirmed the subscription, so a
subscriber that reads history afterwards cannot miss an event published in between. After a
lost connection every channel is subscribed again and its subscribers told to catch up from
history, since anything published meanwhile never reached us.

Every map here holds only channels someone follows now (``_unacked`` only SUBSCRIBEs still
awaiting Redis's confirmation): a gateway that serves millions of short sessions keeps no trace
of the ones that ended. The hub's Redis client must not retry on its own (redis-py would
reconnect and resubscribe under us, hiding the loss); a confirmation nobody asked for is taken
as such a hidden reconnect all the same.

The reader is the hot path: it waits once for each batch of replies that arrive together and
handles all of them before it yields, and it decodes each message once, whatever the number of
its subscribers; they all get the same dict and the JSON text as published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.codec import decode_event, text
from shared.logs import log
from shared.protocol import EventDict

logger = logging.getLogger("tokenbus.gateway.hub")

SUBSCRIBE_TIMEOUT_S = 10.0
#: How long channels left wait to go out together in one UNSUBSCRIBE.
UNSUBSCRIBE_AFTER_S = 0.05
#: Longest wait for a reply before the reader looks again (a health-check PING when idle).
READ_WAIT_S = 1.0
#: Called once per live event received, before fan-out (metrics); must not block.
LiveHook = Callable[[EventDict], None]


class Subscriber(Protocol):
    def on_event(self, event: EventDict, raw: str) -> None:
        """A live event from the channel (called on the hub's reader task: must not block)."""

    def on_resubscribed(self) -> None:
        """The connection was lost and is back: events may have been missed."""


class Hub:
    def __init__(
        self,
        redis: Redis,
        *,
        on_live: LiveHook | None = None,
        subscribe_timeout_s: float = SUBSCRIBE_TIMEOUT_S,
    ) -> None:
        self._redis = redis
        self._on_live = on_live
        self._subscribe_timeout_s = subscribe_timeout_s
        self._pubsub: PubSub | None = None
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._leaving: set[str] = set()  # channels left, to unsubscribe in one go
        self._ready: dict[str, asyncio.Future[None]] = {}
        #: SUBSCRIBE commands sent, per channel, not yet confirmed (no entry: none pending).
        self._unacked: dict[str, int] = {}
        self._recovering: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self.connected = False
        self._closing = False

    @property
    def alive(self) -> bool:
        return self.connected and self._reader is not None and not self._reader.done()

    @property
    def channels(self) -> int:
        return len(self._subscribers)

    def tracked(self) -> dict[str, int]:
        """Sizes of the per-channel maps (all 0 once every follower left and Redis confirmed)."""
        return {
            "subscribers": len(self._subscribers),
            "ready": len(self._ready),
            "unacked": len(self._unacked),
            "recovering": len(self._recovering),
        }

    async def start(self) -> None:
        await self._connect()
        self._reader = asyncio.create_task(self._read_loop(), name="hub-reader")

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            # The loop also ends on the flag: a task awaiting redis-py can swallow a cancel.
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=2.0)
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        for fut in self._ready.values():
            if not fut.done():
                fut.cancel()

    async def attach(self, channel: str, subscriber: Subscriber) -> None:
        """Add ``subscriber`` to ``channel``; returns once the channel is subscribed.

        Raises a redis ConnectionError at once while the pub/sub connection is down (the
        caller answers 503 or closes with "unavailable", and the client retries), and a redis
        TimeoutError when Redis does not confirm in time; either way nothing is left behind.
        """
        if not self.connected:
            raise RedisConnectionError("the gateway's pub/sub connection to Redis is down")
        subs = self._subscribers.get(channel)
        first = subs is None
        if subs is None:
            subs = self._subscribers[channel] = set()
            self._ready[channel] = asyncio.get_running_loop().create_future()
        # Added before the SUBSCRIBE goes out, so a failure below always finds it to remove.
        subs.add(subscriber)
        ready = self._ready[channel]
        try:
            if first:
                await self._send_subscribe(channel)
            await asyncio.wait_for(asyncio.shield(ready), self._subscribe_timeout_s)
        except TimeoutError as exc:
            self.detach(channel, subscriber)
            raise RedisTimeoutError(f"Redis did not confirm SUBSCRIBE {channel}") from exc
        except BaseException:
            self.detach(channel, subscriber)
            raise

    def detach(self, channel: str, subscriber: Subscriber) -> None:
        subs = self._subscribers.get(channel)
        if subs is None:
            return
        subs.discard(subscriber)
        if not subs:
            del self._subscribers[channel]
            ready = self._ready.pop(channel)
            if not ready.done():
                ready.cancel()
            self._recovering.discard(channel)
            if self._pubsub is not None and self.connected:
                if not self._leaving:
                    loop = asyncio.get_running_loop()
                    loop.call_later(UNSUBSCRIBE_AFTER_S, self._unsubscribe_left)
                self._leaving.add(channel)

    def _unsubscribe_left(self) -> None:
        """One UNSUBSCRIBE for the channels left since the last: streams end in bursts (a
        flush ends many answers at once), and each UNSUBSCRIBE was a write of its own. A
        channel taken again meanwhile stays subscribed; what Redis sends on the others in
        the meantime finds no subscriber and is dropped."""
        channels = [c for c in self._leaving if c not in self._subscribers]
        self._leaving.clear()
        if channels and self._pubsub is not None and self.connected:
            task = asyncio.create_task(self._unsubscribe(self._pubsub, channels))
            task.add_done_callback(_log_failure)

    @staticmethod
    async def _unsubscribe(pubsub: PubSub, channels: list[str]) -> None:
        await pubsub.unsubscribe(*channels)

    async def _send_subscribe(self, channel: str) -> None:
        self._unacked[channel] = self._unacked.get(channel, 0) + 1
        if self._pubsub is None or not self.connected:
            return  # the reader subscribes every channel when it reconnects
        try:
            await self._pubsub.subscribe(channel)
        except BaseException:
            # Not sent, or sent on a connection now lost (the reconnect starts the count anew):
            # no confirmation is coming for it.
            self._ack(channel)
            raise

    def _ack(self, channel: str) -> int:
        """Count one confirmation of ``channel``; returns how many are still pending."""
        left = self._unacked.get(channel, 0) - 1
        if left > 0:
            self._unacked[channel] = left
        else:
            self._unacked.pop(channel, None)
        return max(left, 0)

    async def _connect(self) -> None:
        self._pubsub = self._redis.pubsub()
        self._unacked = {}
        # A pub/sub connection only exists once something is subscribed; this one always is.
        keepalive = "__tokenbus_hub__"
        self._unacked[keepalive] = 1
        channels = [keepalive, *self._subscribers]
        for channel in self._subscribers:
            self._unacked[channel] = 1
        await self._pubsub.subscribe(*channels)
        self.connected = True

    async def _read_loop(self) -> None:
        backoff = 0.05
        while not self._closing:
            try:
                if not self.connected:
                    await self._reconnect()
                    backoff = 0.05
                assert self._pubsub is not None
                await self._read_batch(self._pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self.connected:
                    log(
                        logger,
                        "pubsub_lost",
                        logging.WARNING,
                        error=str(exc),
                        channels=self.channels,
                    )
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                logger.exception("pubsub reader error")
                await asyncio.sleep(0.1)

    async def _read_batch(self, pubsub: PubSub) -> None:
        """Wait for the next reply, then handle every reply already read, without yielding.

        Replies are read straight from the connection: one wait (with its timeout and health
        check) per batch of replies that arrived together, instead of a ``get_message`` call,
        with its retry wrapper, per message. Messages go to ``_on_message`` at once; any other
        reply (a confirmation, the health check's pong) takes redis-py's own ``handle_message``
        first, which keeps the PubSub's channel bookkeeping, then ``_dispatch``.
        """
        conn = pubsub.connection
        if conn is None or not conn.is_connected:
            # Never reconnected here (redis-py would resubscribe under us): lost is lost.
            raise RedisConnectionError("the pub/sub connection is closed")
        await pubsub.check_health()  # a PING once the connection was idle for a while
        reply = await conn.read_response(
            timeout=READ_WAIT_S, disconnect_on_error=False, push_request=True
        )
        buffered = _buffered_replies(conn)
        while reply is not None:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._on_message(reply[1], reply[2])
            else:
                message = await pubsub.handle_message(reply)
                if message is not None:
                    self._dispatch(message)
            reply = buffered()

    async def _reconnect(self) -> None:
        old, self._pubsub = self._pubsub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.aclose()  # type: ignore[no-untyped-call]
        self._recovering = set(self._subscribers)
        await self._connect()
        log(logger, "pubsub_reconnected", channels=self.channels)

    def _on_message(self, channel: bytes | str, data: bytes | str) -> None:
        """A message on ``channel``: decoded once, then given to each of its subscribers."""
        subs = self._subscribers.get(text(channel))
        if not subs:
            return
        try:
            event = decode_event(data)
        except ValueError:
            log(logger, "bad_channel_message", logging.WARNING, channel=text(channel))
            return
        raw = text(data)  # what every client is sent, as published
        if self._on_live is not None:
            try:
                self._on_live(event)
            except Exception:  # a metrics hook never stops delivery
                logger.exception("live event hook failed")
        for sub in tuple(subs):
            sub.on_event(event, raw)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = text(message.get("type"))
        channel = text(message.get("channel"))
        if kind == "message":
            self._on_message(channel, message["data"])
        elif kind == "subscribe":
            if channel not in self._unacked:
                # We sent no SUBSCRIBE for it: redis-py reconnected and resubscribed by itself,
                # so whatever was published meanwhile never reached us.
                if self._subscribers.get(channel):
                    log(logger, "pubsub_resubscribed_under_us", logging.WARNING, channel=channel)
                    self._recovering.add(channel)
            elif self._ack(channel) > 0:
                return
            ready = self._ready.get(channel)
            if ready is not None and not ready.done():
                ready.set_result(None)
            if channel in self._recovering:
                self._recovering.discard(channel)
                for sub in tuple(self._subscribers.get(channel, ())):
                    sub.on_resubscribed()


def _buffered_replies(conn: Any) -> Callable[[], Any]:
    """A function that returns the next reply already read off ``conn``'s socket, else None.

    With hiredis (a dependency: ``redis[hiredis]``) that is its reader's next complete reply;
    with another parser, nothing is known to be buffered and each reply is awaited on its own.
    """
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if not isinstance(parser, _AsyncHiredisParser) or reader is None:
        return _nothing
    gets = reader.gets

    def next_reply() -> Any:
        reply = gets()
        if reply is NOT_ENOUGH_DATA:
            return None
        if isinstance(reply, Exception):  # as the parser's read_response does
            raise reply
        return reply

    return next_reply


def _nothing() -> None:
    return None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log(logger, "unsubscribe_failed", logging.WARNING, error=str(task.exception()))
