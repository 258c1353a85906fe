"""A running job's lease: who runs it, its fencing token, and how far its answer got.

One worker at a time holds a job's lease; it lapses ``ttl`` after the last renewal, and then
any worker may acquire it, with a larger fencing token that the publish script checks, so the
earlier holder can publish nothing more. The lease also carries the job's progress (tokens
published, and what its stored token ids mean), which a new holder continues from. The lease
lives in the session's hash slot, beside the history it guards (shared/lease.lua).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared import codec
from shared.autopipeline import AutoPipeline
from shared.keys import Keys
from shared.scripts import script_source, unpack_ids
from shared.stream.publish import Fence


@dataclass(frozen=True, slots=True)
class Progress:
    """What earlier attempts published of a job's answer."""

    text: str = ""
    token_ids: tuple[int, ...] | None = None  # None: not usable here (another engine or model)
    tokens: int = 0
    started: bool = False  # StreamStart went out (an attempt published something)


@dataclass(frozen=True, slots=True)
class Acquired:
    fence: Fence
    attempts: int  # acquisitions, this one included
    handbacks: int  # of which released by draining or cut-off workers
    progress: Progress

    @property
    def failures(self) -> int:
        """Attempts that ended without handing the job back: the ones max_attempts counts."""
        return self.attempts - self.handbacks


@dataclass(frozen=True, slots=True)
class Busy:
    """Another live worker holds the lease."""

    owner: str
    entry_id: str
    ms_left: int


@dataclass(frozen=True, slots=True)
class Done:
    """The job's terminal event is published: nothing to run."""

    entry_id: str


def lease_keys(keys: Keys, session_id: str, job_id: str) -> list[str]:
    """The KEYS of shared/lease.lua for one job: lease, text, token ids (one hash slot)."""
    return [
        keys.job_lease(session_id, job_id),
        keys.job_text(session_id, job_id),
        keys.job_token_ids(session_id, job_id),
    ]


class Leases:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        ttl_s: float,
        keep_s: int,
        calls: AutoPipeline | None = None,
    ) -> None:
        self._keys = keys
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._keep = str(keep_s)
        # Many jobs taking their leases in one tick share a round trip.
        self._calls = calls if calls is not None else AutoPipeline(redis)
        self._source = script_source("lease")

    async def _script(self, *, keys: list[str], args: list[str], within: float = 0.0) -> Any:
        return await self._calls.script(self._source, keys, args, within=within)

    def _keys_of(self, session_id: str, job_id: str) -> list[str]:
        return lease_keys(self._keys, session_id, job_id)

    async def acquire(
        self,
        session_id: str,
        job_id: str,
        *,
        owner: str,
        entry_id: str,
        space: str,
        within: float = 0.0,
    ) -> Acquired | Busy | Done:
        """Take the lease unless a live holder has it or the job is finished.

        ``within``: seconds the call may wait to ride with another round trip (AutoPipeline).

        ``space`` names what this worker's token ids mean (engine and model): ids stored under
        another space are not handed back, and the new attempt continues from the text.
        """
        reply = await self._script(
            keys=self._keys_of(session_id, job_id),
            args=["acquire", owner, entry_id, str(self.ttl_ms), space, self._keep],
            within=within,
        )
        status = codec.text(reply[0])
        if status == "done":
            return Done(codec.text(reply[1]))
        if status == "busy":
            return Busy(codec.text(reply[1]), codec.text(reply[2]), int(reply[3]))
        fence, attempts, handbacks, text, ids, have, tokens, started = reply[1:9]
        raw_ids = ids if isinstance(ids, bytes) else str(ids).encode("latin-1")
        answer = text.decode() if isinstance(text, bytes) else str(text)
        # Text without ids (written by an engine that has none, or before ids were kept) is
        # continued from the text.
        usable = codec.text(have) == space and (bool(raw_ids) or not answer)
        progress = Progress(
            text=answer,
            token_ids=tuple(unpack_ids(raw_ids)) if usable else None,
            tokens=int(tokens),
            started=codec.text(started) == "1" or bool(answer),
        )
        return Acquired(Fence(codec.text(fence)), int(attempts), int(handbacks), progress)

    async def renew(self, session_id: str, job_id: str, *, owner: str, fence: Fence) -> bool:
        """Extend the lease; False when it moved on (the caller must stop the job)."""
        reply = await self._script(
            keys=self._keys_of(session_id, job_id),
            args=["renew", owner, fence.token, str(self.ttl_ms)],
        )
        return int(reply) == 1  # 2: the job ended under this fence, nothing left to renew

    async def release(self, session_id: str, job_id: str, *, owner: str, fence: Fence) -> bool:
        """Hand the job back now, so another worker continues it without waiting for the TTL."""
        reply = await self._script(
            keys=self._keys_of(session_id, job_id), args=["release", owner, fence.token]
        )
        return bool(reply)
