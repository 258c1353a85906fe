"""The answer to one job, streamed as it comes: ``async for text in chat.ask(...)``."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from shared.client.errors import ResyncError, TokenbusError
from shared.client.model import Answer, EventDict, Position, Usage
from shared.client.resume import _EventStream

if TYPE_CHECKING:
    from shared.client.session import Session


def _starts_job(event: EventDict) -> bool:
    """Whether ``event`` can be a job's first: nothing of its text can come before it."""
    kind = event.get("type")
    if kind in ("stream_start", "error"):
        return True
    return kind == "stream_end" and Usage.of(event.get("usage")).completion_tokens == 0


class AnswerStream:
    """The answer to one job: ``async for`` its text as it comes, or ``await .text()``.

    Nothing happens until it is iterated. ``job_id`` is known once iteration started; ``answer``
    once the job ended. A failed job raises TokenbusError; lost history raises ResyncError.
    """

    def __init__(
        self,
        session: Session,
        *,
        body: dict[str, Any] | None = None,
        job_id: str | None = None,
        start: Position | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self._session = session
        self._body = body
        #: The key the job request carries (every retry of it too); None for ``stream()``.
        self.idempotency_key = idempotency_key
        self._start = start
        self.job_id = job_id
        self.model: str | None = None
        self.answer: Answer | None = None
        self._parts: list[str] = []
        self._stream: _EventStream | None = None
        self._gen: AsyncGenerator[str, None] | None = None
        self._error: BaseException | None = None

    @property
    def reconnects(self) -> int:
        return self._stream.reconnects if self._stream is not None else 0

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> str:
        if self._error is not None:
            raise self._error
        if self._gen is None:
            self._gen = self._run()
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            self._error = exc
            raise

    async def text(self) -> Answer:
        """Wait for the end of the job; the whole answer (text already iterated included)."""
        async for _ in self:
            pass
        assert self.answer is not None
        return self.answer

    async def cancel(self) -> None:
        """Ask the gateway to stop this job; the stream then ends with ``cancelled``."""
        if self.job_id is None:
            raise RuntimeError("the job is not sent yet: iterate the stream first")
        await self._session.cancel(self.job_id)

    async def aclose(self) -> None:
        """Stop following the job (it keeps running: see ``cancel``)."""
        if self._gen is not None:
            await self._gen.aclose()

    async def __aenter__(self) -> AnswerStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[str, None]:
        session = self._session
        start = session.position if self._start is None else self._start
        self._stream = stream = _EventStream(session, start)
        try:
            # Subscribed from a position before the job exists: none of its events is missed.
            await stream.connect()
            if self._body is not None:
                assert self.idempotency_key is not None
                self.job_id = await session._submit(self._body, start, self.idempotency_key)
            lost: EventDict | None = None  # a resync before this job's first event
            seen = False
            while True:
                event = await stream.next()
                kind = event.get("type")
                if kind == "resync":
                    if seen:
                        raise ResyncError(event, self.job_id)
                    lost = event
                    continue
                if event.get("job_id") != self.job_id:
                    continue
                if not seen:
                    seen = True
                    if lost is not None and not _starts_job(event):
                        raise ResyncError(lost, self.job_id)
                if kind == "stream_start":
                    self.model = event.get("model") or self.model
                elif kind == "delta":
                    text = event.get("delta")
                    if isinstance(text, str) and text:
                        self._parts.append(text)
                        yield text
                elif kind == "stream_end":
                    self.answer = Answer(
                        job_id=self.job_id or "",
                        text="".join(self._parts),
                        finish_reason=str(event.get("finish_reason")),
                        usage=Usage.of(event.get("usage")),
                        model=self.model,
                    )
                    return
                elif kind == "error":
                    raise TokenbusError(
                        str(event.get("code", "error")),
                        str(event.get("message", "")),
                        job_id=self.job_id,
                    )
        finally:
            await stream.close()
