"""A session's conversation: its finished exchanges, kept in Redis so later prompts have context.

The worker reads it before answering a chat job and appends the job's exchange when the job
ends (cancelled too: what was said stays said), before the job's terminal event is published,
so a client that sees ``stream_end`` can rely on the next prompt seeing this exchange.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from importlib import resources

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from shared.keys import Keys
from shared.logs import log
from shared.protocol import ChatMessage
from shared.settings import Settings

logger = logging.getLogger("tokenbus.conversation")

REMEMBER_LUA = resources.files("shared").joinpath("remember.lua").read_text()


class Exchange(BaseModel):
    """One job's turn: the messages it sent, and the answer it got."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    messages: tuple[ChatMessage, ...]
    answer: str
    finish_reason: str
    t: float = Field(default_factory=time.time)

    def turns(self) -> list[ChatMessage]:
        return [*self.messages, ChatMessage(role="assistant", content=self.answer)]


def turns(exchanges: Sequence[Exchange]) -> list[ChatMessage]:
    return [m for e in exchanges for m in e.turns()]


def _marker(job_id: str) -> str:
    # How an entry of this job starts: encode() writes job_id first, in this exact form.
    return '{"job_id":' + json.dumps(job_id, ensure_ascii=False) + ","


def encode(exchange: Exchange) -> str:
    body = exchange.model_dump(mode="json")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class Conversations:
    def __init__(self, redis: Redis, keys: Keys, *, max_exchanges: int, ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._max = max(1, max_exchanges)
        self._ttl = ttl_s
        self._remember = redis.register_script(REMEMBER_LUA)

    @classmethod
    def from_settings(cls, redis: Redis, keys: Keys, settings: Settings) -> Conversations:
        return cls(
            redis,
            keys,
            max_exchanges=settings.conversation_max_exchanges,
            ttl_s=settings.conversation_ttl_s,
        )

    async def load(self, session_id: str) -> list[Exchange]:
        """The session's exchanges, oldest first (none once it expired)."""
        raw = await self._redis.lrange(self._keys.session_conversation(session_id), 0, -1)
        exchanges = []
        for entry in raw:
            try:
                exchanges.append(Exchange.model_validate_json(entry))
            except ValidationError as exc:  # one bad entry must not lose the others
                log(logger, "bad_exchange", logging.WARNING, session=session_id, error=str(exc))
        return exchanges

    async def remember(self, session_id: str, exchange: Exchange) -> bool:
        """Append ``exchange``; False when it is already the last one (a redelivered job)."""
        added = await self._remember(
            keys=[self._keys.session_conversation(session_id)],
            args=[_marker(exchange.job_id), encode(exchange), self._max, self._ttl],
        )
        return bool(added)

    async def forget(self, session_id: str) -> None:
        await self._redis.delete(self._keys.session_conversation(session_id))
