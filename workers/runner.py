"""One job's execution on one worker: take its lease, publish its answer, record how it ended.

Per job, in order: the session gets StreamStart (only from the first attempt that gets that
far), Deltas, then exactly one terminal event (StreamEnd or Error); the record gets its final
state; only then is the entry acknowledged. An attempt that loses its lease (another worker
took the job over, or Redis lost what it published) stops at once and publishes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from shared.conversation import Exchange
from shared.jobs import JobState, mark_running, set_state, settle
from shared.keys import JOBS_GROUP
from shared.lease import Acquired, Busy, Done, Progress
from shared.logs import log
from shared.outage import is_transient, ride_out
from shared.protocol import Error, FinishReason, Job
from shared.stream.publish import Fence, LostWrites, StaleFence
from workers.deadletter import dead_letter
from workers.engine import EngineDead, EngineDelta, EngineError
from workers.intake import Fields
from workers.publisher import JobPublisher

if TYPE_CHECKING:
    from workers.consumer import Worker

logger = logging.getLogger("tokenbus.worker")


class Interrupted(Exception):
    """The engine ended the job's request without a cancel: the job goes back, unfinished."""


@dataclass(slots=True)
class Running:
    """A job this worker picked up, from its entry until it ends or is dropped."""

    job: Job
    entry_id: str
    fields: Fields
    fence: Fence | None = None  # set once the lease is ours
    cancel_requested: bool = False
    abort_repeated: bool = False
    lease_lost: bool = False  # renewal found the lease moved on: stop, publish nothing
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: JobState
    finish: str  # finish reason or error code
    tokens: int = 0
    first_token_s: float | None = None


class JobRunner:
    """Runs one job for ``worker`` (which owns the Redis clients, engine and settings)."""

    def __init__(self, worker: Worker, running: Running) -> None:
        self.w = worker
        self.running = running
        self.job = running.job

    async def run(self) -> None:
        w, running, job = self.w, self.running, self.job
        try:
            await self._run()
        finally:
            if running.fence is not None:
                w.keeper.drop(job.id, running.fence.token)

    async def _run(self) -> None:
        w, running, job = self.w, self.running, self.job
        try:
            outcome = await self._attempt()
            if outcome is None:
                return
            if running.fence is not None:  # ended: the lease is done, nothing to renew
                w.keeper.drop(job.id, running.fence.token)
            await ride_out(lambda: self._finish(outcome), hold_s=w.settings.outage_hold_s)
            w.metrics.finished(outcome.state)
            self._log_finished(outcome)
        except asyncio.CancelledError:
            log(
                logger, "job_interrupted", logging.WARNING, job_id=job.id, entry_id=running.entry_id
            )
            raise
        except StaleFence as exc:  # another worker holds the job now: it answers
            log(logger, "job_fenced", logging.WARNING, job_id=job.id, reason=str(exc))
            w.metrics.left.labels("fenced").inc()
        except Interrupted as exc:
            log(logger, "job_interrupted", logging.WARNING, job_id=job.id, reason=str(exc))
            with contextlib.suppress(RedisError):
                await w.recovery.hand_back(running)
        except LostWrites as exc:
            await self._after_lost_writes(exc)
        except EngineDead as exc:  # left pending: another worker continues it
            w.engine_died(str(exc), job.id)
        except Exception as exc:
            # Redis unreachable past the hold: the lease lapses, another worker continues.
            event = "job_handed_back" if is_transient(exc) else "job_crashed"
            log(
                logger,
                event,
                logging.ERROR,
                job_id=job.id,
                error=repr(exc),
                exc=None if is_transient(exc) else traceback.format_exc(),
            )

    async def _finish(self, outcome: Outcome) -> None:
        w, running = self.w, self.running
        # The end has landed; the record and the ack may ride with the next round trip.
        await settle(
            w.calls,
            w.keys,
            self.job.id,
            outcome.state,
            w.settings.job_ttl_s,
            stream=w.stream,
            entry_id=running.entry_id,
            within=w.batcher.window,
            finish=outcome.finish,
            finished_at=time.time(),
        )

    async def _attempt(self) -> Outcome | None:
        """Publish the job's events up to its terminal one; None when it is not ours to run."""
        w, running, job, settings = self.w, self.running, self.job, self.w.settings
        lease = await ride_out(
            lambda: w.leases.acquire(
                job.session_id,
                job.id,
                owner=w.consumer,
                entry_id=running.entry_id,
                space=w.engine.token_space,
            ),
            hold_s=settings.outage_hold_s,
        )
        if not isinstance(lease, Acquired):
            await self._not_ours(lease)
            return None
        running.fence = lease.fence
        w.keeper.hold(job.session_id, job.id, lease.fence.token, running.entry_id)
        progress = lease.progress
        remembers = job.memory and job.messages is not None

        async def remember(answer: str, finish: FinishReason) -> None:
            await self._remember(answer, finish)

        pub = JobPublisher(
            w.batcher,
            job,
            model=settings.model,
            fence=lease.fence,
            hold_s=settings.outage_hold_s,
            prefix=progress.text,
            on_end=remember if remembers else None,
        )
        try:
            if lease.failures > settings.max_attempts:
                return await self._give_up(pub, lease.failures)
            if job.deadline is not None and job.deadline < time.time():
                await pub.error(
                    "deadline_exceeded", "the job's deadline passed before it could run"
                )
                return Outcome("failed", "deadline_exceeded")
            # Awaited only before anything is published: the engine starts meanwhile (its first
            # token takes longer than this write, which may ride a quarter window with another
            # round trip), yet a job cancelled before it ran still publishes only its end.
            marking = asyncio.ensure_future(
                mark_running(
                    w.calls,
                    w.keys,
                    job.id,
                    settings.job_ttl_s,
                    within=w.batcher.urgent_window,
                    worker=w.consumer,
                    entry_id=running.entry_id,
                    session_id=job.session_id,
                    model=settings.model,
                    attempts=lease.attempts,
                    started_at=time.time(),
                )
            )
            try:
                history = await w.conversations.load(job.session_id) if remembers else []
            except BaseException:
                await _settled(marking)
                raise
            return await self._stream(pub, progress, history, marking, lease.attempts)
        finally:
            await pub.aclose()

    async def _not_ours(self, lease: Busy | Done) -> None:
        w, running, job = self.w, self.running, self.job
        if isinstance(lease, Busy) and lease.entry_id == running.entry_id:
            # This very entry, reclaimed while its holder still renews: leave it pending, and
            # claimable again only once the lease would have lapsed.
            await w.recovery.leave_pending(running.entry_id, ms_left=lease.ms_left)
            return
        if isinstance(lease, Done) and lease.entry_id == running.entry_id:
            # Redelivered after its worker finished it but died before acknowledging.
            log(logger, "job_already_finished", job_id=job.id, entry_id=running.entry_id)
            await w.redis.xack(w.stream, JOBS_GROUP, running.entry_id)
            return
        # Another entry of the same job (enqueued twice): acknowledged and recorded, not run.
        state = "finished" if isinstance(lease, Done) else "running"
        await w.duplicate(job.id, running.entry_id, of=state)

    async def _remember(self, answer: str, finish: FinishReason) -> None:
        if finish == "cancelled" and not answer:
            return  # stopped before it said anything: nothing to remember
        job = self.job
        assert job.messages is not None
        exchange = Exchange(
            job_id=job.id, messages=tuple(job.messages), answer=answer, finish_reason=finish
        )
        await self.w.conversations.remember(job.session_id, exchange)

    async def _started(
        self, pub: JobPublisher, progress: Progress, history: list[Exchange], attempts: int
    ) -> None:
        """The job runs: its StreamStart is queued (not for a continued answer: the client
        sees one answer) and the start logged."""
        w, job = self.w, self.job
        if not progress.started:
            await pub.start(attempt=attempts - 1)
        elif progress.tokens:
            w.metrics.continued.inc()
        assert self.running.fence is not None
        log(
            logger,
            "job_started",
            job_id=job.id,
            session_id=job.session_id,
            attempt=attempts - 1,
            fence=self.running.fence.token,
            continued_tokens=progress.tokens,
            from_ids=progress.token_ids is not None and bool(progress.token_ids),
            history=len(history),
        )

    async def _stream(
        self,
        pub: JobPublisher,
        progress: Progress,
        history: list[Exchange],
        marking: asyncio.Future[str | None],
        attempts: int,
    ) -> Outcome:
        w, running, job = self.w, self.running, self.job
        first_token_s: float | None = None
        last_t: float | None = None  # engine time of the last token
        continued = bool(progress.tokens or progress.text)
        deltas: AsyncIterator[EngineDelta] | None = None
        first: asyncio.Future[EngineDelta] | None = None  # the engine's first step, started early
        finished = False
        try:
            deltas = w.engine.generate(
                job, prefix=progress.text, prefix_ids=progress.token_ids, history=history
            )
            # The engine starts on its first step; the record says "running" meanwhile.
            first = asyncio.ensure_future(anext(deltas))
            cancelled_before = await marking
            if cancelled_before is not None or running.cancel_requested:
                # The engine is stopped below (the answer is not finished).
                await pub.end("cancelled")
                return Outcome("cancelled", "cancelled")
            await self._started(pub, progress, history, attempts)
            while True:
                try:
                    if first is not None:
                        delta, first = await first, None
                    else:
                        delta = await anext(deltas)
                except StopAsyncIteration:
                    log(logger, "engine_no_finish", logging.WARNING, job_id=job.id)
                    await pub.end("stop")
                    finished = True
                    return Outcome("done", "stop", pub.published_tokens, first_token_s)
                if running.lease_lost:
                    raise StaleFence(f"job {job.id}: the lease moved on")
                cancelled = delta.finish_reason == "cancelled"
                if cancelled and not running.cancel_requested:
                    # Stopped under us, not by a cancel (the engine shutting down): the answer
                    # is not over, so it must not end with "cancelled"; another worker goes on.
                    raise Interrupted(f"job {job.id}: the engine stopped it")
                if running.cancel_requested and not running.abort_repeated:
                    # A cancel that came before the engine knew the job: repeat it now.
                    running.abort_repeated = True
                    await w.engine.abort(job.id)
                if first_token_s is None and delta.tokens:
                    first_token_s = time.monotonic() - running.started
                if delta.tokens:
                    last_t = w.count_tokens(delta, last_t, job, continued=continued)
                await pub.add(delta)
                if delta.finish_reason is not None:
                    finished = True
                    state: JobState = "cancelled" if cancelled else "done"
                    return Outcome(state, delta.finish_reason, pub.published_tokens, first_token_s)
        except EngineError as exc:
            if pub.ended:
                raise
            finished = True
            await pub.error(exc.code, exc.message)
            return Outcome("failed", exc.code, pub.published_tokens, first_token_s)
        except (
            RedisError,
            asyncio.CancelledError,
            EngineDead,
            StaleFence,
            LostWrites,
            Interrupted,
        ):
            raise
        except Exception as exc:
            if pub.ended:
                raise
            log(
                logger,
                "engine_error",
                logging.ERROR,
                job_id=job.id,
                error=repr(exc),
                exc=traceback.format_exc(),
            )
            finished = True
            await pub.error("engine_error", f"the engine failed: {exc}")
            return Outcome("failed", "engine_error", pub.published_tokens, first_token_s)
        finally:
            await _settled(marking)
            if first is not None:
                await _settled(first)
            if not finished:
                with contextlib.suppress(Exception):
                    await w.engine.abort(job.id)
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _give_up(self, pub: JobPublisher, failures: int) -> Outcome:
        w, running, job = self.w, self.running, self.job
        reason = f"job was attempted {failures - 1} times; the limit is {w.settings.max_attempts}"
        await dead_letter(
            w.redis,
            w.keys,
            maxlen=w.settings.dead_maxlen,
            stream=w.stream,
            entry_id=running.entry_id,
            fields=running.fields,
            code="too_many_attempts",
            reason=reason,
            job_id=job.id,
            session_id=job.session_id,
        )
        await pub.error("too_many_attempts", reason)
        return Outcome("failed", "too_many_attempts")

    async def _after_lost_writes(self, exc: LostWrites) -> None:
        """Redis came back without some of what this attempt published (restart, failover).

        The session already has a new epoch, so its followers resync. The job goes back to
        the queue when its entry survived (it continues from what Redis still holds); when the
        entry is gone too, the session gets an error: never silence.
        """
        w, running, job = self.w, self.running, self.job
        log(logger, "job_lost_writes", logging.ERROR, job_id=job.id, error=str(exc))
        w.metrics.left.labels("lost_writes").inc()
        try:
            if running.fence is not None:
                await w.leases.release(
                    job.session_id, job.id, owner=w.consumer, fence=running.fence
                )
            if await w.redis.xrange(w.stream, running.entry_id, running.entry_id):
                await w.recovery.leave_pending(running.entry_id, ms_left=0)
                return
            message = "Redis lost this job while it ran (restarted without its data); send it again"
            error = Error(code="job_lost", message=message, job_id=job.id)
            await w.sessions.publish(job.session_id, [error], job_id=job.id)
            await set_state(
                w.redis, w.keys, job.id, "failed", w.settings.job_ttl_s, error="job_lost"
            )
            w.metrics.finished("failed")
        except RedisError as err:
            log(logger, "job_lost_unreported", logging.ERROR, job_id=job.id, error=repr(err))

    def _log_finished(self, outcome: Outcome) -> None:
        running = self.running
        fields: dict[str, Any] = {
            "job_id": running.job.id,
            "session_id": running.job.session_id,
            "state": outcome.state,
            "finish": outcome.finish,
            "tokens": outcome.tokens,
            "duration_ms": round((time.monotonic() - running.started) * 1000, 1),
        }
        if outcome.first_token_s is not None:
            fields["ttft_ms"] = round(outcome.first_token_s * 1000, 1)
        event = {"cancelled": "job_cancelled", "failed": "job_failed"}.get(
            outcome.state, "job_finished"
        )
        log(logger, event, **fields)


async def _settled(future: asyncio.Future[Any]) -> None:
    """Cancel ``future`` (unless done) and wait for it to end; its outcome no longer matters."""
    if not future.done():
        future.cancel()
        await asyncio.wait([future])  # a cancel of the caller itself still propagates
    if not future.cancelled():
        future.exception()  # retrieved, so it is not reported as never retrieved
