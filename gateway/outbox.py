"""A client's bounded outgoing queue.

Deltas of one job that pile up behind a slow client merge into one: the client still gets
every character, under the later offset, and ``from_offset`` says where the merged run began.
Past its limits the queue closes and the connection is dropped with a code telling the client
to resume: it never holds up anyone else. A client that stops reading altogether blocks the
write to it instead; ``write_within`` bounds that wait, so such a client is dropped on the
gateway's clock, not when (if ever) it reads again.

Nothing here costs a task or a timer per event: a waiting ``get`` re-arms one timer per outbox
only when it fires (keep-alives are rare), and ``write_within`` arms its stall timeout only for
a write that can wait at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from shared.codec import dump_event
from shared.protocol import EventDict

SLOW_CONSUMER = "slow_consumer"
#: Why a connection was cut: a write to it waited longer than the stall limit.
STALLED = "stalled"
_OVERHEAD = 96  # rough bytes of JSON around a delta's text


class Direct(Protocol):
    """Writes events to the client past the write loop (``gateway.direct_write``)."""

    def write(self, out: Outgoing) -> bool:
        """Take ``out`` for the client's socket; False when it cannot without waiting (the
        transport's buffer is full, or it is closing): the event is queued as usual then."""

    def flush(self) -> None:
        """Send what was taken and not sent yet: the write loop writes after it."""

    def detach(self) -> None:
        """Flush, then take nothing more."""


@dataclass(slots=True)
class Outgoing:
    event: EventDict
    raw: str | None = None  # the JSON as received, while it is still exact

    def text(self) -> str:
        if self.raw is None:
            self.raw = dump_event(self.event)
        return self.raw

    def size(self) -> int:
        return (
            len(self.raw) if self.raw is not None else len(self.event.get("delta", "")) + _OVERHEAD
        )


class Outbox:
    def __init__(self, max_events: int, max_bytes: int, coalesce_after: int = 32) -> None:
        self._items: deque[Outgoing] = deque()
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        # A short backlog (a history replay) goes out as published; only a growing one merges.
        self._coalesce_after = min(coalesce_after, max(1, max_events // 2))
        self._waiter: asyncio.Future[bool] | None = None  # a get() waiting: True when woken
        self._deadline: float | None = None  # when that get() gives up (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._taken = asyncio.Event()  # set whenever items leave the queue
        self.closed: str | None = None  # why, once closed
        self.coalesced = 0
        #: Set by the connection's write loop: see ``put``.
        self.direct: Direct | None = None
        self.direct_writes = 0

    @property
    def max_events(self) -> int:
        return self._max_events

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: EventDict, raw: str | None = None) -> None:
        if self.closed is not None:
            return
        # Nothing queued and the write loop parked in get(): no write is under way, so the
        # event may go out at once, in order, without waking that task (a task switch and
        # aiohttp's write coroutines per event were most of the gateway's own CPU per token).
        direct = self.direct
        if (
            direct is not None
            and self._waiter is not None
            and not self._items
            and direct.write(Outgoing(event, raw))
        ):
            self.direct_writes += 1
            return
        last = self._items[-1] if self._items else None
        if (
            last is not None
            and len(self._items) >= self._coalesce_after
            and event.get("type") == "delta"
            and last.event.get("type") == "delta"
            and last.event.get("job_id") == event.get("job_id")
            and last.event.get("epoch") == event.get("epoch")
        ):
            self._bytes -= last.size()
            merged = dict(event)
            merged["delta"] = last.event["delta"] + event["delta"]
            merged["tokens"] = int(last.event.get("tokens", 1)) + int(event.get("tokens", 1))
            merged["from_offset"] = last.event.get("from_offset", last.event.get("offset"))
            last.event, last.raw = merged, None
            self._bytes += last.size()
            self.coalesced += 1
        else:
            item = Outgoing(event, raw)
            self._items.append(item)
            self._bytes += item.size()
        if len(self._items) > self._max_events or self._bytes > self._max_bytes:
            self.close(SLOW_CONSUMER)
        self._wake()

    async def wait_for_room(self) -> None:
        """Wait until the queue is at most half full (or closed).

        A history replay waits here between events, so a backlog longer than the limits
        (a resume after a slow-consumer drop) goes out as fast as the client reads it, instead
        of overflowing the queue again at the same place.
        """
        while self.closed is None and (
            len(self._items) >= max(1, self._max_events // 2) or self._bytes >= self._max_bytes // 2
        ):
            self._taken.clear()
            await self._taken.wait()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            if reason == SLOW_CONSUMER:
                self._items.clear()
                self._bytes = 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._wake()
        self._taken.set()

    def detach_direct(self) -> None:
        """The write loop is ending: what was written past it goes out now, then nothing."""
        direct, self.direct = self.direct, None
        if direct is not None:
            direct.detach()

    async def get(self, wait_s: float | None = None) -> Outgoing | None:
        """Next item; None when closed (and drained) or when ``wait_s`` passes first.

        What was written past the caller meanwhile is sent first: whatever the caller writes
        next goes after it."""
        try:
            while not self._items:
                if self.closed is not None or not await self._wait(wait_s):
                    return None
        finally:
            if self.direct is not None:
                self.direct.flush()
        item = self._items.popleft()
        self._bytes -= item.size()
        self._taken.set()
        return item

    async def _wait(self, wait_s: float | None) -> bool:
        """Until something is put or the outbox closes (True), or ``wait_s`` passes (False)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        if wait_s is None:
            self._deadline = None
        else:
            self._deadline = loop.time() + wait_s
            if self._timer is None:  # else the armed timer moves itself on when it fires
                self._timer = loop.call_at(self._deadline, self._on_timer)
        try:
            return await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _on_timer(self) -> None:
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return  # nobody waits with a limit now: the next get() arms a timer again
        loop = waiter.get_loop()
        if loop.time() >= deadline:
            waiter.set_result(False)
        else:
            self._timer = loop.call_at(deadline, self._on_timer)

    def get_nowait(self) -> Outgoing | None:
        taken = self.take_ready(1)
        return taken[0] if taken else None

    def take_ready(self, limit: int) -> list[Outgoing]:
        """Up to ``limit`` items already queued, without waiting (to write them together)."""
        taken: list[Outgoing] = []
        while self._items and len(taken) < limit:
            item = self._items.popleft()
            self._bytes -= item.size()
            taken.append(item)
        if taken:
            self._taken.set()
        return taken


class ClientStalled(ConnectionError):
    """A write to a client did not complete in time: it stopped reading."""


async def write_within(
    write: Awaitable[object],
    stall_s: float,
    transport: asyncio.Transport | None,
    size: int,
    *,
    abort: bool = True,
) -> None:
    """``await write`` (of ``size`` bytes), but cut the connection if it takes over ``stall_s``.

    A write waits only when the kernel's and the transport's buffers are full, which a reading
    client empties within moments: one that waits this long has stopped reading. The transport
    is aborted (unless ``abort`` is false: the caller does it) rather than closed, since closing
    waits to flush what the client never reads. Raises ClientStalled then.

    A write into an empty transport buffer that fits under its high-water mark cannot wait (the
    protocol is paused only above it), so only other writes pay for a timeout.
    """
    if transport is not None and not _may_wait(transport, size):
        await write
        return
    try:
        async with asyncio.timeout(stall_s):
            await write
    except TimeoutError:
        if transport is not None and abort:
            transport.abort()
        raise ClientStalled(f"no write completed in {stall_s} s") from None


def _may_wait(transport: asyncio.Transport, size: int) -> bool:
    if transport.get_write_buffer_size():
        return True
    return size > transport.get_write_buffer_limits()[1]
