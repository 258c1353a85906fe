"""A client's bounded outgoing queue.

Deltas of one job that pile up behind a slow client merge into one: the client still gets
every character, under the later offset, and ``from_offset`` says where the merged run began.
Past its limits the queue closes and the connection is dropped with a code telling the client
to resume: it never holds up anyone else. A client that stops reading altogether blocks the
write to it instead; ``write_within`` bounds that wait, so such a client is dropped on the
gateway's clock, not when (if ever) it reads again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

from shared.codec import dump_event
from shared.protocol import EventDict

SLOW_CONSUMER = "slow_consumer"
#: Why a connection was cut: a write to it waited longer than the stall limit.
STALLED = "stalled"
_OVERHEAD = 96  # rough bytes of JSON around a delta's text


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
        self._wakeup = asyncio.Event()
        self._taken = asyncio.Event()  # set whenever items leave the queue
        self.closed: str | None = None  # why, once closed
        self.coalesced = 0

    @property
    def max_events(self) -> int:
        return self._max_events

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: EventDict, raw: str | None = None) -> None:
        if self.closed is not None:
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
        self._wakeup.set()

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
        self._wakeup.set()
        self._taken.set()

    async def get(self, wait_s: float | None = None) -> Outgoing | None:
        """Next item; None when closed (and drained) or when ``wait_s`` passes first."""
        while not self._items:
            if self.closed is not None:
                return None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait_s)
            except TimeoutError:
                return None
        item = self._items.popleft()
        self._bytes -= item.size()
        self._taken.set()
        return item

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
    write: Awaitable[object], stall_s: float, transport: asyncio.Transport | None
) -> None:
    """``await write``, but cut the connection if it takes over ``stall_s`` seconds.

    A write waits only when the kernel's and the transport's buffers are full, which a reading
    client empties within moments: one that waits this long has stopped reading. The transport
    is aborted rather than closed, since closing waits to flush what the client never reads.
    Raises ClientStalled then.
    """
    try:
        await asyncio.wait_for(write, stall_s)
    except TimeoutError:
        if transport is not None:
            transport.abort()
        raise ClientStalled(f"no write completed in {stall_s} s") from None
