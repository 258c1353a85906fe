"""Publishing one job's answer on its session, through the worker's batcher.

The engine's deltas are buffered here and leave in the worker's next flush
(``workers.batcher.PublishBatcher``), merged into one Delta per flush: a fast engine costs
one script call per flush, not one per token. The first token goes at once, in a flush that
starts now; the end is urgent: it goes first in the next flush, which waits a quarter of the
batcher's window at most.

Every batch is fenced by the job's lease (``shared.stream.publish.Fence``): a publisher whose
job moved to another worker gets StaleFence and must stop. While Redis is unreachable the
batcher retries the same batches (the script recognises one it applied already) and the engine
keeps generating; what it said meanwhile goes out in the next batch, up to ``hold_s`` of outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shared.codec import AnyEvent, encode_event
from shared.outage import ride_out
from shared.protocol import Error, FinishReason, Job, StreamEnd, StreamStart, Usage
from shared.stream.publish import Batch, Fence, Published, encode_delta
from workers.batcher import PublishBatcher
from workers.engine import EngineDelta

#: Called with the whole answer (all attempts' text) just before StreamEnd is published.
OnEnd = Callable[[str, FinishReason], Awaitable[None]]


class JobPublisher:
    """Events of one job, in order: StreamStart, Deltas, then one terminal StreamEnd or Error."""

    def __init__(
        self,
        batcher: PublishBatcher,
        job: Job,
        *,
        model: str,
        fence: Fence | None = None,
        hold_s: float = 30.0,
        prefix: str = "",
        on_end: OnEnd | None = None,
    ) -> None:
        self._batcher = batcher
        self._session_id = job.session_id
        self._job_id = job.id
        self._created_at = job.created_at
        self._model = model
        self._fence = fence
        self._hold_s = hold_s
        self._on_end = on_end
        # Buffered, not yet taken by a flush:
        self._parts: list[str] = []
        self._ids: list[int] = []
        self._tokens = 0
        self._t = 0.0
        # Encoded events queued before the buffered text began, and after it: in that order.
        self._head: list[str] = []
        self._tail: list[str] = []
        self._terminal = False
        self._waiters: list[asyncio.Future[None]] = []
        # Taken by a flush, not yet landed: (batch, its waiters).
        self._flight: tuple[Batch, list[asyncio.Future[None]]] | None = None
        self._first_sent = False
        self._failure: BaseException | None = None
        self._closed = False
        self._answer: list[str] = [prefix] if prefix else []  # the whole answer, as generated
        self.ended = False
        self.published_tokens = 0
        batcher.join(self)

    async def start(self, attempt: int = 0) -> None:
        """Queue StreamStart for the next flush; the engine need not wait for it to land.

        Not urgent: it goes with the next tick's flush (or with the first token, whichever
        comes first), instead of costing an urgent flush of its own per job. What follows is
        published after it (one job's batches land in order); a failure to publish it is
        raised by the next add or end.
        """
        self._raise_failure()
        start = StreamStart(
            job_id=self._job_id, model=self._model, attempt=attempt, created_at=self._created_at
        )
        self._queue(encode_event(start))
        self._batcher.ready(self)

    async def add(self, delta: EngineDelta) -> None:
        """Buffer ``delta`` for the next flush; a final delta also ends the job with StreamEnd."""
        self._raise_failure()
        if delta.finish_reason is not None:
            self._buffer(delta)
            await self.end(delta.finish_reason, delta.usage)
            return
        if not delta.text and not delta.tokens:
            return
        self._buffer(delta)
        if self._first_sent:
            self._batcher.ready(self, urgent=True)
            return
        # The first token alone, at once, and landed before the next is taken: time to first
        # token is what users feel.
        self._first_sent = True
        await self._landing(at_once=True)

    async def end(self, finish_reason: FinishReason, usage: Usage | None = None) -> None:
        """Publish what is buffered and StreamEnd, in one script call."""
        end = StreamEnd(job_id=self._job_id, finish_reason=finish_reason, usage=usage or Usage())
        await self._end(end, finish_reason)

    async def error(self, code: str, message: str) -> None:
        """Publish what is buffered and an Error that ends the job, in one script call."""
        await self._end(Error(code=code, message=message, job_id=self._job_id))

    async def aclose(self) -> None:
        """Publish nothing more (the job ended, or is abandoned); what is buffered is dropped."""
        self._closed = True
        self._batcher.forget(self)

    # The batcher's side (workers.batcher.Source)

    def take(self) -> Batch | None:
        if self._flight is not None or (self._closed and not self._waiters):
            return None
        events: list[str] = self._head
        text, ids, tokens = "", self._ids, self._tokens
        if self._parts:
            text = "".join(self._parts)
            events.append(encode_delta(self._job_id, text, tokens, self._t))
        events.extend(self._tail)
        waiters = self._waiters
        if not events:
            for waiter in waiters:  # nothing left to publish: what they waited for has landed
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters = []
            return None
        batch = Batch(
            self._session_id,
            events,
            job_id=self._job_id,
            text=text,
            fence=self._fence,
            token_ids=ids,
            tokens=tokens,
            terminal=self._terminal,
        )
        self._parts, self._ids, self._tokens, self._waiters = [], [], 0, []
        self._head, self._tail = [], []
        self._flight = (batch, waiters)
        return batch

    def landed(self, batch: Batch, result: Published | BaseException) -> None:
        assert self._flight is not None and self._flight[0] is batch
        waiters = self._flight[1]
        self._flight = None
        if isinstance(result, BaseException):
            self._failure = self._failure or result
            # Later batches can only fail the same way.
            for waiter in [*waiters, *self._waiters]:
                if not waiter.done():
                    waiter.set_exception(result)
            self._waiters = []
            return
        self.published_tokens += batch.tokens
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if (self._parts or self._head or self._tail) and not self._closed:
            self._batcher.ready(self, urgent=bool(self._waiters))

    # Internals

    async def _end(self, event: AnyEvent, finish: FinishReason | None = None) -> None:
        if self.ended:
            raise RuntimeError(f"job {self._job_id} already ended")
        self._raise_failure()
        if finish is not None and self._on_end is not None:
            answer = "".join(self._answer)
            on_end = self._on_end
            await ride_out(lambda: on_end(answer, finish), hold_s=self._hold_s)
        self._terminal = True
        await self._publish(event)
        self.ended = True

    async def _publish(self, event: AnyEvent) -> None:
        """Queue ``event`` after what is buffered; returns once it was published."""
        self._raise_failure()
        self._queue(encode_event(event))
        await self._landing()

    async def _landing(self, *, at_once: bool = False) -> None:
        """Send what is queued in the next flush, urgently; return once it has landed."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._batcher.ready(self, urgent=True, at_once=at_once)
        await waiter

    def _queue(self, event: str) -> None:
        (self._tail if self._parts else self._head).append(event)

    def _buffer(self, delta: EngineDelta) -> None:
        if delta.text or delta.tokens:
            self._parts.append(delta.text)
            self._answer.append(delta.text)
            self._ids.extend(delta.token_ids)
            self._tokens += delta.tokens
            self._t = delta.t

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
