"""Lua scripts and their typed callers."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from importlib import resources

from redis.asyncio import Redis

from shared import codec
from shared.codec import AnyEvent, encode_event
from shared.keys import Keys

PUBLISH_LUA = resources.files("shared").joinpath("publish.lua").read_text()


class SessionPublisher:
    """Publishes events on sessions: one round trip, one atomic script call per batch."""

    def __init__(self, redis: Redis, keys: Keys, *, history_maxlen: int, ttl_s: int) -> None:
        self._keys = keys
        self._maxlen = str(history_maxlen)
        self._ttl = str(ttl_s)
        self._script = redis.register_script(PUBLISH_LUA)

    async def publish(
        self,
        session_id: str,
        events: Sequence[AnyEvent],
        *,
        job_id: str = "_",
        text: str = "",
    ) -> tuple[str, int]:
        """Publish ``events`` in order; append ``text`` to the job's published answer.

        Returns the session epoch and the offset of the last event.
        """
        k = self._keys
        keys = [
            k.session_meta(session_id),
            k.session_history(session_id),
            k.session_channel(session_id),
            k.job_text(session_id, job_id),
        ]
        args = [secrets.token_hex(6), self._maxlen, self._ttl, text]
        args.extend(encode_event(e) for e in events)
        epoch, offset = await self._script(keys=keys, args=args)
        return codec.text(epoch), int(offset)
