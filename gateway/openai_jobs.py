"""One OpenAI request's job, on a session of its own: subscribe, submit, read to its end.

The request subscribes before it submits, so no event can come before it listens; the session
is new, so nothing but this job is on it. A request that ends before its job does (the client
left, or writing to it failed) cancels the job: nobody else will read that answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import Any

from redis.exceptions import RedisError

from gateway.drain import DRAINING, draining_error
from gateway.errors import ApiError
from gateway.outbox import SLOW_CONSUMER
from gateway.requests import PromptRequest
from gateway.state import Gateway
from shared.jobs import request_cancel
from shared.keys import META_TTL_FIELD
from shared.logs import log
from shared.protocol import TERMINAL_TYPES, EventDict, Job, new_id
from shared.stream.position import Position

logger = logging.getLogger("tokenbus.gateway.openai")

#: Strong references to tasks that must outlive a cancelled handler (asyncio keeps weak ones).
_BACKGROUND: set[asyncio.Future[Any]] = set()

#: Why an answer could not be delivered whole, by the reason its outbox closed.
_LOST: dict[str, str] = {
    SLOW_CONSUMER: "the client read too slowly and the answer outgrew its buffer",
}


def _keep(task: asyncio.Future[Any]) -> None:
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


class JobRun:
    """``async with JobRun(...) as run``: ``run.job`` is queued and its events are coming."""

    def __init__(self, gw: Gateway, prompt: PromptRequest, *, route: str, stream: bool) -> None:
        self.gw = gw
        self.route = route
        self.stream = stream
        self.session_id = new_id("s_")
        self.model = prompt.model or gw.settings.default_model
        self._prompt = prompt
        self._outbox = gw.outbox()
        self._subscription = gw.subscription(self.session_id, self._outbox, Position())
        self._job: Job | None = None
        self._started = time.monotonic()
        #: The job's finish reason or error code once its terminal event came.
        self.outcome: str | None = None
        #: Why delivery failed before that (the outbox closed, a resync).
        self.failure: str | None = None
        #: Answer tokens delivered so far (deltas say how many each holds).
        self.tokens = 0

    @property
    def job(self) -> Job:
        assert self._job is not None, "used outside 'async with'"
        return self._job

    def headers(self) -> dict[str, str]:
        return {"X-Tokenbus-Job-Id": self.job.id, "X-Tokenbus-Session-Id": self.session_id}

    async def __aenter__(self) -> JobRun:
        await self._subscription.start()
        # A draining gateway lets this answer run until its deadline, then ends it here.
        self.gw.drain.add_answer(self._outbox)
        # Shielded: a client that leaves mid-submit still gets its job cancelled once it exists.
        submit = asyncio.ensure_future(self._submit())
        try:
            self._job = await asyncio.shield(submit)
        except asyncio.CancelledError:
            submit.add_done_callback(self._cancel_submitted)
            _keep(submit)
            self._close()
            raise
        except BaseException:
            self._close()
            raise
        log(
            logger,
            "openai_request",
            route=self.route,
            session=self.session_id,
            job=self.job.id,
            model=self.model,
            stream=self.stream,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()
        if self.outcome is None:
            _keep(asyncio.create_task(self._cancel(self.job.id)))
        log(
            logger,
            "openai_response",
            route=self.route,
            session=self.session_id,
            job=self.job.id,
            outcome=self.outcome or self.failure or _exit_reason(exc),
            tokens=self.tokens,
            duration_ms=round((time.monotonic() - self._started) * 1000, 1),
        )

    async def next_event(self, wait_s: float) -> EventDict | None:
        """The job's next event, None when ``wait_s`` passed first (time for a keep-alive).

        Raises ApiError when the answer cannot be delivered whole.
        """
        while True:
            item = await self._outbox.get(wait_s=wait_s)
            if item is None:
                if self._outbox.closed is None:
                    return None
                self.failure = reason = self._outbox.closed
                if reason == DRAINING:
                    raise draining_error()
                raise ApiError(500, reason, _LOST.get(reason, f"answer lost: {reason}"))
            event = item.event
            if event.get("type") == "resync":  # part of the answer is gone for good
                self.failure = "stream_interrupted"
                raise ApiError(500, self.failure, "part of the answer could not be read")
            if event.get("job_id") != self.job.id:
                continue
            if event["type"] == "delta":
                self.tokens += int(event.get("tokens", 1))
            elif event["type"] in TERMINAL_TYPES:
                self.outcome = str(event.get("finish_reason") or event.get("code"))
            return event

    def _close(self) -> None:
        self._subscription.close()
        self.gw.drain.discard(self._outbox)

    async def _submit(self) -> Job:
        # Nobody can resume this session (no client is ever given its token), so it
        # lives openai_history_ttl_s, not history_ttl_s: publish.lua gives its history and
        # answer text the TTL found in the meta hash.
        ttl = self.gw.settings.openai_history_ttl_s
        meta = self.gw.keys.session_meta(self.session_id)
        async with self.gw.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta, META_TTL_FIELD, ttl)
            pipe.expire(meta, ttl)
            await pipe.execute()
        return await self.gw.intake.submit(self.session_id, self._prompt)

    def _cancel_submitted(self, submit: asyncio.Future[Job]) -> None:
        if not submit.cancelled() and submit.exception() is None:
            _keep(asyncio.create_task(self._cancel(submit.result().id)))

    async def _cancel(self, job_id: str) -> None:
        s = self.gw.settings
        try:
            await request_cancel(
                self.gw.redis, self.gw.keys, job_id, reason="disconnect", ttl_s=s.job_ttl_s
            )
        except RedisError as exc:  # the job runs to its end; nothing else is harmed
            log(logger, "openai_cancel_failed", logging.WARNING, job=job_id, error=str(exc))


def _exit_reason(exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError | ConnectionError):
        return "disconnected"
    return type(exc).__name__ if exc is not None else "unfinished"
