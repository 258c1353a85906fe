"""The engine contract: what the worker needs from anything that turns a job into tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.conversation import Exchange
from shared.protocol import FinishReason, Job, Usage


@dataclass(frozen=True, slots=True)
class EngineDelta:
    """New answer text from an engine. The last delta of a request carries finish and usage."""

    text: str
    tokens: int  # tokens in this delta
    t: float  # unix time the engine emitted it
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    #: The ids of this delta's tokens, where the engine has them: a later attempt continues
    #: from prompt + these ids rather than re-tokenized text, so it picks up exactly here.
    token_ids: tuple[int, ...] = ()


class EngineError(Exception):
    """A request the engine refuses or cannot finish; ``code`` goes to the client as is."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EngineDead(Exception):
    """The engine can run nothing any more (its process died): the worker stops.

    The job that saw it is left unacknowledged, for another worker to continue; publishing an
    error would turn one broken worker into failed answers for every session it holds.
    """


class Engine(Protocol):
    """One engine per worker, shared by all its running jobs (continuous batching)."""

    name: str

    #: What this engine's token ids mean (engine, model, vocabulary): ids published by an
    #: engine with another space are never fed back to this one.
    @property
    def token_space(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        """Stream the answer to ``job``; the last delta has ``finish_reason`` set.

        ``prefix`` is answer text an earlier attempt already published: generation continues
        after it and never emits it again. ``prefix_ids``, when given, are that text's token
        ids (in this engine's ``token_space``): the engine continues from them exactly, and
        uses ``prefix`` only when they are missing. An answer that cannot be continued
        faithfully (a seeded sample) raises EngineError("not_resumable").
        ``history`` is the session's earlier exchanges, for a chat job: the engine puts the
        latest that fit its context in front of the job's messages (workers.context.fit).
        Raises EngineError for requests it refuses.
        """
        ...

    async def abort(self, job_id: str) -> None:
        """Stop ``job_id`` promptly; its generator ends with a "cancelled" final delta.

        Does nothing for a job the engine is not running.
        """
        ...
