"""Reading a session's position and history in one consistent snapshot."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from shared.codec import decode_event, text
from shared.keys import Keys
from shared.protocol import EventDict
from shared.stream.position import HISTORY_FIELD

_FIELD = HISTORY_FIELD.encode()


@dataclass(frozen=True, slots=True)
class Snapshot:
    epoch: str | None  # None: nothing published, or the session expired
    offset: int  # last offset published in ``epoch``
    events: list[tuple[EventDict, str]]  # (event, raw JSON) after the requested offset


class History:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def read(self, session_id: str, after: int) -> Snapshot:
        """The session's epoch and last offset, and the events after offset ``after``."""
        meta = self._keys.session_meta(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(meta, ["epoch", "offset"])
            pipe.xrange(self._keys.session_history(session_id), min=f"{after + 1}-0", max="+")
            (epoch, offset), entries = await pipe.execute()
        events: list[tuple[EventDict, str]] = []
        for _entry_id, fields in entries:
            raw = fields[_FIELD]
            # Decoded once here, from the bytes; the text is what clients are sent as is.
            events.append((decode_event(raw), text(raw)))
        return Snapshot(
            epoch=epoch.decode() if isinstance(epoch, bytes) else epoch,
            offset=int(offset) if offset is not None else 0,
            events=events,
        )
