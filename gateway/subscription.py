"""One client's view of one session: every event once, in order, or an explicit resync.

Centrifugo's recipe: subscribe first and buffer live events, read history from the client's
position, deliver it, then drain the buffer skipping what history already gave, then go live.
A live event that is not the next offset means something was missed (a dropped pub/sub
connection): buffer again and catch up from history.

Where a client is in the session is a ``shared.stream.position.Position``: the last event it
got, or the one a resync moved it to. A live event that comes right after it is delivered
(``next_is``), one it had already is skipped (``has``), anything else is a gap.

Catch-up is single-flight: one task at a time owns it (the first one included), and a reason
to catch up that comes while it runs (a resubscribe, a gap) makes that same task go round once
more instead of starting a second reader of history that could deliver an event twice. Redis
errors that pass with time (a restart, an AOF load) are retried while live events buffer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.hub import Hub
from gateway.outbox import SLOW_CONSUMER, Outbox
from shared.keys import Keys
from shared.logs import log
from shared.protocol import EventDict
from shared.stream.history import History, Snapshot
from shared.stream.position import Position

logger = logging.getLogger("tokenbus.gateway.subscription")

UNAVAILABLE = "history_unavailable"
#: How long a catch-up keeps retrying history reads through a Redis outage before it gives up
#: and the client is told to reconnect (its buffer of live events may overflow first).
CATCH_UP_RETRY_S = 60.0
#: Redis errors that end by themselves (BusyLoadingError, "LOADING", is a ConnectionError).
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
Listener = Callable[[EventDict], None]
#: Told the reason of each resync sent (metrics).
ResyncHook = Callable[[str], None]


#: The position of a client that saw nothing yet.
_NOTHING_SEEN = Position()


def _at(epoch: str | None, offset: int) -> Position:
    """``Position(epoch, offset)`` without NamedTuple's __new__ in Python (per event per client)."""
    return tuple.__new__(Position, (epoch, offset))


def _first_offset(snap: Snapshot) -> int:
    return int(snap.events[0][0]["offset"]) if snap.events else snap.offset + 1


class Phase(enum.Enum):
    CATCHING_UP = "catching_up"  # live events buffer while history is read
    LIVE = "live"  # live events are delivered as they come
    CLOSED = "closed"


class SessionSubscription:
    def __init__(
        self,
        session_id: str,
        *,
        hub: Hub,
        history: History,
        keys: Keys,
        outbox: Outbox,
        position: Position = _NOTHING_SEEN,
        listener: Listener | None = None,
        on_resync: ResyncHook | None = None,
    ) -> None:
        self.session_id = session_id
        self.channel = keys.session_channel(session_id)
        #: The last event delivered (or skipped by a resync): where a resume would start.
        self.position = position
        self._hub = hub
        self._history = history
        self._outbox = outbox
        self._listener = listener
        self._on_resync = on_resync
        self._buffer: list[tuple[EventDict, str]] | None = []  # not None while catching up
        self._again = False
        #: The one task that catches up, while it runs (the first catch-up's too).
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.catch_ups = 0  # catch-up tasks started (one per run of reasons, never concurrent)

    @property
    def epoch(self) -> str | None:
        return self.position.epoch

    @property
    def offset(self) -> int:
        return self.position.offset

    @property
    def phase(self) -> Phase:
        if self._closed:
            return Phase.CLOSED
        return Phase.LIVE if self._buffer is None else Phase.CATCHING_UP

    async def start(self) -> None:
        """Subscribe, then deliver history from the position; raises if either fails."""
        await self._hub.attach(self.channel, self)
        try:
            # The first catch-up runs in the task every later reason joins (see _start_catch_up);
            # its errors reach the caller, which closes the connection.
            self._task = asyncio.create_task(self._catch_up())
            self.catch_ups += 1
            await self._task
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.detach(self.channel, self)
        if self._task is not None:
            self._task.cancel()

    # Hub callbacks
    def on_event(self, event: EventDict, raw: str) -> None:
        if self._buffer is not None:
            self._buffer.append((event, raw))
            if len(self._buffer) > self._outbox.max_events:
                self._outbox.close(SLOW_CONSUMER)
            return
        self._accept(event, raw)

    def on_resubscribed(self) -> None:
        self._start_catch_up()

    # Internals
    def _accept(self, event: EventDict, raw: str) -> None:
        epoch, offset = event.get("epoch"), event.get("offset")
        if not isinstance(offset, int) or not isinstance(epoch, str):
            log(logger, "event_without_position", logging.WARNING, session=self.session_id)
            return
        if self.position.next_is(epoch, offset):
            self._deliver(event, raw, epoch, offset)
            return
        if self.position.has(epoch, offset):
            return  # already delivered
        # A gap or a new epoch: history knows what happened.
        self._start_catch_up()
        assert self._buffer is not None
        self._buffer.append((event, raw))

    def _deliver(self, event: EventDict, raw: str | None, epoch: str | None, offset: int) -> None:
        self.position = _at(epoch, offset)
        self._outbox.put(event, raw)
        if self._listener is not None:
            self._listener(event)

    def _resync(self, reason: str, epoch: str | None, offset: int) -> None:
        event: dict[str, Any] = {"type": "resync", "reason": reason, "offset": offset}
        if epoch is not None:
            event["epoch"] = epoch
        log(
            logger,
            "resync",
            session=self.session_id,
            reason=reason,
            from_epoch=self.epoch,
            from_offset=self.offset,
            epoch=epoch,
            offset=offset,
        )
        self.position = Position(epoch, offset)
        self._outbox.put(event)
        if self._on_resync is not None:
            self._on_resync(reason)

    def _start_catch_up(self) -> None:
        if self._closed:
            return
        if self._buffer is None:
            self._buffer = []
        if self._task is not None and not self._task.done():
            # Refused: the running catch-up reads history once more before it goes live.
            self._again = True
            return
        self._task = asyncio.create_task(self._catch_up_guarded())
        self.catch_ups += 1

    async def _catch_up_guarded(self) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + CATCH_UP_RETRY_S
        backoff = 0.05
        while True:
            try:
                await self._catch_up()
                return
            except asyncio.CancelledError:
                raise
            except _TRANSIENT as exc:
                if loop.time() + backoff > give_up_at or self._outbox.closed is not None:
                    self._give_up(exc)
                    return
                log(
                    logger,
                    "catch_up_retry",
                    logging.WARNING,
                    session=self.session_id,
                    error=str(exc),
                    retry_in_s=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception as exc:
                self._give_up(exc)
                return

    def _give_up(self, exc: Exception) -> None:
        log(logger, "catch_up_failed", logging.WARNING, session=self.session_id, error=str(exc))
        self._outbox.close(UNAVAILABLE)

    async def _catch_up(self) -> None:
        while True:
            self._again = False
            await self._apply(await self._history.read(self.session_id, self.offset))
            buffered, self._buffer = self._buffer or [], None
            for event, raw in buffered:
                self._accept(event, raw)
            if not self._again and self._buffer is None:
                return
            if self._buffer is None:
                self._buffer = []

    async def _apply(self, snap: Snapshot) -> None:
        if snap.epoch is None:
            if self.epoch is not None or self.offset > 0:
                self._resync("history_expired", None, 0)
            return
        stale = self.epoch is not None and snap.epoch != self.epoch
        ahead = not stale and self.offset > snap.offset
        if stale or ahead:
            snap = await self._history.read(self.session_id, 0)
            if snap.epoch is None:
                self._resync("history_expired", None, 0)
                return
            self._resync(
                "epoch_changed" if stale else "offset_ahead", snap.epoch, _first_offset(snap) - 1
            )
        else:
            self.position = Position(snap.epoch, self.offset)
            first = _first_offset(snap)
            if first > self.offset + 1:
                self._resync("history_trimmed", snap.epoch, first - 1)
        for event, raw in snap.events:
            offset = int(event["offset"])
            if offset > self.offset:
                await self._outbox.wait_for_room()
                if self._outbox.closed is not None:
                    return
                self._deliver(event, raw, event.get("epoch", self.epoch), offset)
