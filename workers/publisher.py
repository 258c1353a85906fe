"""Publishing one job's answer on its session, with deltas coalesced over a short window.

The first delta goes out at once (time to first token is what users feel); later ones are
batched so a fast engine costs one script call per window rather than one per token. A flusher
task wakes at ``last flush + window``, so a trailing batch never waits for a next token.

Every batch is fenced by the job's lease (``shared.scripts.Fence``): a publisher whose job
moved to another worker gets StaleFence and must stop. While Redis is unreachable a batch is
retried as it was (the script recognises one it applied already); the engine keeps generating
meanwhile and what it said goes out in the next batch, up to ``hold_s`` of outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from shared.codec import AnyEvent
from shared.outage import ride_out
from shared.protocol import Delta, Error, FinishReason, Job, StreamEnd, StreamStart, Usage
from shared.scripts import Fence, SessionPublisher
from workers.engine import EngineDelta

#: Called with the whole answer (all attempts' text) just before StreamEnd is published.
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
        fence: Fence | None = None,
        hold_s: float = 30.0,
        prefix: str = "",
        on_end: OnEnd | None = None,
    ) -> None:
        self._sessions = sessions
        self._session_id = job.session_id
        self._job_id = job.id
        self._created_at = job.created_at
        self._model = model
        self._window = max(window_ms, 0.0) / 1000.0
        self._fence = fence
        self._hold_s = hold_s
        # One publish at a time, taken in call order: offsets follow the answer's order.
        self._lock = asyncio.Lock()
        self._parts: list[str] = []
        self._ids: list[int] = []
        self._tokens = 0
        self._t = 0.0
        self._first_sent = False
        self._last_flush = 0.0
        self._pending = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._on_end = on_end
        self._text: list[str] = [prefix] if prefix else []  # the answer, earlier attempts' too
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
                answer = "".join(self._text + self._parts)
                on_end = self._on_end
                await ride_out(lambda: on_end(answer, finish), hold_s=self._hold_s)
            await self._send([event], terminal=True)
            self.ended = True

    def _buffer(self, delta: EngineDelta) -> None:
        if delta.text or delta.tokens:
            self._parts.append(delta.text)
            self._ids.extend(delta.token_ids)
            self._tokens += delta.tokens
            self._t = delta.t

    async def _send(self, extra: list[AnyEvent], *, terminal: bool = False) -> None:
        """Publish the batched text (if any) then ``extra``; the caller holds the lock."""
        events: list[AnyEvent] = []
        text = ""
        ids: list[int] = []
        tokens = 0
        if self._parts:
            text = "".join(self._parts)
            ids, tokens = self._ids, self._tokens
            events.append(Delta(job_id=self._job_id, delta=text, tokens=tokens, t=self._t))
            self._parts, self._ids, self._tokens = [], [], 0
        events.extend(extra)
        if not events:
            return
        self._last_flush = asyncio.get_running_loop().time()
        sessions, sid, job_id, fence = self._sessions, self._session_id, self._job_id, self._fence
        await ride_out(
            lambda: sessions.publish_batch(
                sid,
                events,
                job_id=job_id,
                text=text,
                fence=fence,
                token_ids=ids,
                tokens=tokens,
                terminal=terminal and fence is not None,
            ),
            hold_s=self._hold_s,
        )
        if text:
            self._text.append(text)
        self.published_tokens += tokens

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
