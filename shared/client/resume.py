"""A session's event stream that survives drops: reconnects, resumes, drops duplicates."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from shared.client.errors import _TRANSIENT, ConnectionLostError, _Draining, _Dropped
from shared.client.links import _Link
from shared.client.model import EventDict, Position

if TYPE_CHECKING:
    from shared.client.session import Session

logger = logging.getLogger("tokenbus.client")

#: A link that stayed up this long before it dropped was healthy, even with nothing to deliver.
_HEALTHY_LINK_S = 5.0


class _EventStream:
    """One resumable subscription to a session: connects, reconnects, resumes, drops duplicates."""

    def __init__(self, session: Session, position: Position) -> None:
        self._session = session
        self.epoch, self.offset = position
        self._link: _Link | None = None
        self._backoff = 0.0  # before the next connection attempt; 0 after a healthy link
        self._stalled_since: float | None = None  # first drop since an event was delivered
        self._opened_at = 0.0
        self._base = ""  # the gateway the link is (or was last) connected to
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
                self._session.client._move_on(self._base)
                now = asyncio.get_running_loop().time()
                if now - self._opened_at >= _HEALTHY_LINK_S:
                    self._backoff, self._stalled_since = 0.0, None
                elif isinstance(exc, _Draining) and self._stalled_since is None:
                    # Sent elsewhere on purpose, not failing: no reason to wait. A gateway
                    # that keeps doing so without progress still meets the usual backoff.
                    self._backoff = 0.0
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
        tried: set[str] = set()  # gateways that failed since the last wait
        wait = self._backoff
        while True:
            if wait:
                if loop.time() + wait > deadline:
                    message = (
                        f"no progress from the gateway at {', '.join(client.base_urls)} for "
                        f"{client.reconnect_timeout_s:g} s; last failure: {failure}"
                    )
                    logger.warning("session %s: %s", self._session.session_id, message)
                    raise ConnectionLostError(message)
                await asyncio.sleep(wait)
            attempts += 1
            base = client.base_url
            tried.add(base)
            try:
                self._link = await self._session._open_link(base, (self.epoch, self.offset))
            except (_Dropped, *_TRANSIENT) as exc:
                logger.debug("session %s: connecting failed: %r", self._session.session_id, exc)
                failure = str(exc) or type(exc).__name__
                client._move_on(base)
                if client.base_url in tried:  # each gateway failed once: back off
                    tried.clear()
                    self._grow_backoff()
                    wait = self._backoff
                else:
                    wait = 0.0  # another gateway may answer at once
                continue
            self._base = base
            break
        self._opened_at = loop.time()
        # Reset only once the link delivers an event: one that keeps dropping at once backs off.
        self._grow_backoff()
        if reason is not None:
            self.reconnects += 1
            self._session.reconnects += 1
            logger.info(
                "session %s: reconnected to %s over %s after %d attempt(s) (%s); "
                "resuming after %s:%d",
                self._session.session_id,
                self._base,
                self._session.transport,
                attempts,
                reason,
                self.epoch,
                self.offset,
            )
