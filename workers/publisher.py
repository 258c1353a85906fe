"""Publishing one job's answer on its session, with deltas coalesced over a short window.

The first delta goes out at once (time to first token is what users feel); later ones are
batched so a fast engine costs one script call per window rather than one per token. A flusher
task wakes at ``last flush + window``, so a trailing batch never waits for a next token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from shared.codec import AnyEvent
from shared.protocol import Delta, Error, FinishReason, Job, StreamEnd, StreamStart, Usage
from shared.scripts import SessionPublisher
from workers.engine import EngineDelta

#: Called with the whole answer (this attempt's text) just before StreamEnd is published.
OnEnd = Callable[[str, FinishReason], Awaitable[None]]


class JobPublisher:
    """Events of one job, in order: StreamStart, Deltas, then one terminal StreamEnd or Error."""

    def __init__(
        self,
        sessions: SessionPublisher,
        job: Job,
        *,
        model: str,
        window_ms: float,
        on_end: OnEnd | None = None,
    ) -> None:
        self._sessions = sessions
        self._session_id = job.session_id
        self._job_id = job.id
        self._created_at = job.created_at
        self._model = model
        self._window = max(window_ms, 0.0) / 1000.0
        # One publish at a time, taken in call order: offsets follow the answer's order.
        self._lock = asyncio.Lock()
        self._parts: list[str] = []
        self._tokens = 0
        self._t = 0.0
        self._first_sent = False
        self._last_flush = 0.0
        self._pending = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._failure: Exception | None = None
        self._on_end = on_end
        self._text: list[str] = []  # published by this attempt
        self.ended = False
        self.published_tokens = 0

    async def start(self, attempt: int = 0) -> None:
        async with self._lock:
            start = StreamStart(
                job_id=self._job_id,
                model=self._model,
                attempt=attempt,
                created_at=self._created_at,
            )
            await self._send([start])

    async def add(self, delta: EngineDelta) -> None:
        """Publish (or batch) ``delta``; a final delta also ends the job with StreamEnd."""
        self._raise_failure()
        if delta.finish_reason is not None:
            self._buffer(delta)
            await self.end(delta.finish_reason, delta.usage)
            return
        if not delta.text and not delta.tokens:
            return
        self._buffer(delta)
        if not self._first_sent:
            self._first_sent = True
            async with self._lock:
                await self._send([])
            return
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())
        self._pending.set()

    async def end(self, finish_reason: FinishReason, usage: Usage | None = None) -> None:
        """Publish what is batched and StreamEnd, in one script call."""
        end = StreamEnd(job_id=self._job_id, finish_reason=finish_reason, usage=usage or Usage())
        await self._terminal(end, finish_reason)

    async def error(self, code: str, message: str) -> None:
        """Publish what is batched and an Error that ends the job, in one script call."""
        await self._terminal(Error(code=code, message=message, job_id=self._job_id))

    async def aclose(self) -> None:
        """Stop the flusher without publishing (the job ended, or is abandoned)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None

    async def _terminal(self, event: AnyEvent, finish: FinishReason | None = None) -> None:
        if self.ended:
            raise RuntimeError(f"job {self._job_id} already ended")
        # Holding the lock, the flusher is never cut off mid-publish when it is stopped.
        async with self._lock:
            await self.aclose()
            self._raise_failure()
            if finish is not None and self._on_end is not None:
                await self._on_end("".join(self._text + self._parts), finish)
            await self._send([event])
            self.ended = True

    def _buffer(self, delta: EngineDelta) -> None:
        if delta.text or delta.tokens:
            self._parts.append(delta.text)
            self._tokens += delta.tokens
            self._t = delta.t

    async def _send(self, extra: list[AnyEvent]) -> None:
        """Publish the batched text (if any) then ``extra``; the caller holds the lock."""
        events: list[AnyEvent] = []
        text = ""
        if self._parts:
            text = "".join(self._parts)
            self._text.append(text)
            events.append(Delta(job_id=self._job_id, delta=text, tokens=self._tokens, t=self._t))
            self.published_tokens += self._tokens
            self._parts.clear()
            self._tokens = 0
        events.extend(extra)
        if not events:
            return
        self._last_flush = asyncio.get_running_loop().time()
        await self._sessions.publish(self._session_id, events, job_id=self._job_id, text=text)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._pending.wait()
                delay = self._last_flush + self._window - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._pending.clear()
                async with self._lock:
                    await self._send([])
        except Exception as exc:  # surfaces on the job's next add/end
            self._failure = exc

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
