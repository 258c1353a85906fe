"""The worker: takes jobs from its model's stream as it has free slots and runs each on the engine.

Per job, in order: the session gets StreamStart, Deltas, then exactly one terminal event
(StreamEnd or Error); the record gets its final state; only then is the entry acknowledged.
A job whose worker dies before that stays pending in the group, for another worker to take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from shared.codec import BadJob, decode_job
from shared.conversation import Conversations, Exchange
from shared.jobs import TERMINAL_STATES, JobState, get_record, set_state
from shared.keys import JOBS_GROUP, Keys
from shared.logs import log
from shared.protocol import Error, FinishReason, Job
from shared.redis_client import connect
from shared.scripts import SessionPublisher
from shared.settings import Settings
from workers.control import control_tail, read_control
from workers.deadletter import dead_letter
from workers.engine import Engine, EngineDead, EngineDelta, EngineError
from workers.engines import make_engine
from workers.heartbeat import beat
from workers.intake import Fields, check_limits, stream_entries, usable_ids
from workers.metrics import WorkerMetrics
from workers.publisher import JobPublisher

logger = logging.getLogger("tokenbus.worker")


@dataclass(slots=True)
class _Running:
    job: Job
    entry_id: str
    fields: Fields
    cancel_requested: bool = False
    abort_repeated: bool = False
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class _Outcome:
    state: JobState
    finish: str  # finish reason or error code
    tokens: int = 0
    first_token_s: float | None = None


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """Consumes ``keys.jobs_stream(settings.model)`` in group ``JOBS_GROUP`` until stopped."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, *, drain_timeout_s: float = 30.0
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.engine = engine if engine is not None else make_engine(settings)
        self.consumer = settings.worker_id or default_worker_id()
        self.stream = self.keys.jobs_stream(settings.model)
        self.drain_timeout_s = drain_timeout_s
        #: This worker's Prometheus metrics (its own registry).
        self.metrics = WorkerMetrics()
        self._redis = connect(settings)
        # Blocking reads get a client whose socket timeout outlasts BLOCK.
        self._blocking = connect(settings, block_ms=settings.block_ms)
        self._sessions = SessionPublisher(
            self._redis,
            self.keys,
            history_maxlen=settings.history_maxlen,
            ttl_s=settings.history_ttl_s,
        )
        self._conversations = Conversations.from_settings(self._redis, self.keys, settings)
        self._jobs: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._closing = asyncio.Event()  # ends the control and heartbeat loops
        #: Set once start() has joined the group and announced the model.
        self.ready = asyncio.Event()
        self._control_after = "0-0"
        self._started_at = time.time()
        self._started = False
        self._in_run = False
        #: Why the worker stopped on its own (its engine died); None after a requested stop.
        self.failure: str | None = None

    @property
    def running(self) -> int:
        """Slots taken: jobs picked up and not yet finished."""
        return len(self._tasks)

    # Lifecycle

    async def start(self) -> None:
        """Join the group, start the engine, announce the model. run() calls it if needed."""
        if self._started:
            return
        await self._ensure_group()
        self._control_after = await control_tail(self._redis, self.keys)
        await self.engine.start()
        await self._beat()
        self._started = True
        self.ready.set()
        log(
            logger,
            "worker_ready",
            model=self.settings.model,
            slots=self.settings.worker_slots,
            consumer=self.consumer,
            engine=self.engine.name,
        )

    async def run(self) -> None:
        """Run until stop(): read jobs, then drain the running ones and close the engine."""
        self._in_run = True
        background: list[asyncio.Task[None]] = []
        try:
            await self.start()
            background = [
                asyncio.create_task(self._control_loop(), name="worker-control"),
                asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
            ]
            await self._read_loop()
            await self._drain()
        finally:
            await self._abandon_jobs()
            self._closing.set()
            # Cancelling only hastens them: they also end by the flag within one BLOCK.
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._shutdown()
            self._finished.set()

    def request_stop(self) -> None:
        """Stop taking jobs (safe to call from a signal handler); run() then drains and returns."""
        self._stopping.set()
        self._slot_freed.set()

    async def stop(self) -> None:
        """Stop taking jobs and wait until run() has drained the running ones and returned."""
        self.request_stop()
        if self._in_run:
            await self._finished.wait()

    async def _shutdown(self) -> None:
        try:
            await self.engine.close()
        except Exception as exc:
            log(logger, "engine_close_failed", logging.ERROR, error=repr(exc))
        with contextlib.suppress(RedisError):
            await self._redis.delete(self.keys.worker(self.consumer))
        await self._blocking.aclose()
        await self._redis.aclose()
        log(logger, "worker_stopped", consumer=self.consumer)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log(logger, "worker_draining", running=len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_timeout_s)
        if pending:
            log(logger, "drain_timeout", logging.WARNING, abandoned=len(pending))

    async def _abandon_jobs(self) -> None:
        # Unacknowledged, they stay pending in the group for another worker to continue.
        # Cancel again while any remain: redis-py on Python 3.11 can swallow a cancel.
        for _ in range(10):
            if not self._tasks:
                return
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(set(self._tasks), timeout=1.0)

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self.stream, JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # Reading jobs

    async def _read_loop(self) -> None:
        while not self._stopping.is_set():
            free = self.settings.worker_slots - len(self._tasks)
            if free <= 0:
                # No await since counting: a slot freed meanwhile would have been seen.
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                reply = await self._blocking.xreadgroup(
                    JOBS_GROUP,
                    self.consumer,
                    {self.stream: ">"},
                    count=free,
                    block=max(self.settings.block_ms, 1),
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # the stream was deleted under us
                continue
            except RedisError as exc:
                log(logger, "jobs_read_failed", logging.WARNING, error=repr(exc))
                await asyncio.sleep(1.0)
                continue
            for entry_id, fields in stream_entries(reply):
                await self._dispatch(entry_id, fields)

    async def _dispatch(self, entry_id: str, fields: Fields) -> None:
        try:
            job = decode_job(fields)
            check_limits(job, self.settings)
        except BadJob as bad:
            job_id, session_id = usable_ids(bad)
            await self._refuse(entry_id, fields, bad.code, bad.reason, job_id, session_id)
            return
        if job.id in self._jobs:
            # The same job twice at once would interleave its answer; the running one stands.
            await self._refuse(
                entry_id, fields, "duplicate_job", "job is already running here", job.id, None
            )
            return
        running = _Running(job, entry_id, fields)
        self._jobs[job.id] = running
        task = asyncio.create_task(self._run_job(running), name=f"job-{job.id}")
        self._tasks.add(task)
        self.metrics.jobs_running.inc()
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.metrics.jobs_running.dec()
        self._slot_freed.set()

    async def _refuse(
        self,
        entry_id: str,
        fields: Fields,
        code: str,
        reason: str,
        job_id: str | None,
        session_id: str | None,
    ) -> None:
        """Dead-letter an entry, then acknowledge it and tell its session (when one is known)."""
        log(
            logger,
            "bad_entry",
            logging.WARNING,
            entry_id=entry_id,
            code=code,
            reason=reason,
            job_id=job_id,
            session_id=session_id,
        )
        self.metrics.finished("refused")
        try:
            await dead_letter(
                self._redis,
                self.keys,
                maxlen=self.settings.dead_maxlen,
                stream=self.stream,
                entry_id=entry_id,
                fields=fields,
                code=code,
                reason=reason,
                job_id=job_id,
                session_id=session_id,
            )
            await self._redis.xack(self.stream, JOBS_GROUP, entry_id)
            if session_id:
                error = Error(code=code, message=reason, job_id=job_id)
                await self._sessions.publish(session_id, [error], job_id=job_id or "_")
            if job_id and code != "duplicate_job":
                await set_state(
                    self._redis, self.keys, job_id, "failed", self.settings.job_ttl_s, error=code
                )
        except RedisError as exc:  # left pending; never stops the loop
            log(logger, "bad_entry_failed", logging.ERROR, entry_id=entry_id, error=repr(exc))

    # Control

    async def _control_loop(self) -> None:
        await read_control(
            self._blocking,
            self.keys,
            after=self._control_after,
            block_ms=self.settings.block_ms,
            on_cancel=self._on_cancel,
            stop=self._closing,
        )

    async def _on_cancel(self, job_id: str, reason: str) -> None:
        running = self._jobs.get(job_id)
        if running is None:
            return  # not ours (or not started: the record's cancel flag stops it)
        running.cancel_requested = True
        log(logger, "cancel_requested", job_id=job_id, reason=reason)
        await self.engine.abort(job_id)

    async def _heartbeat_loop(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_s):
                    await self._closing.wait()
            if self._closing.is_set():
                return
            try:
                await self._beat()
            except RedisError as exc:
                log(logger, "heartbeat_failed", logging.WARNING, error=repr(exc))

    async def _beat(self) -> None:
        await beat(
            self._redis,
            self.keys,
            worker_id=self.consumer,
            model=self.settings.model,
            slots=self.settings.worker_slots,
            running=len(self._tasks),
            started_at=self._started_at,
            interval_s=self.settings.heartbeat_s,
        )

    # Running a job

    async def _run_job(self, running: _Running) -> None:
        job = running.job
        try:
            outcome = await self._execute(running)
            if outcome is not None:
                # State before ack: a redelivered entry whose record is final is only acked.
                await set_state(
                    self._redis,
                    self.keys,
                    job.id,
                    outcome.state,
                    self.settings.job_ttl_s,
                    finish=outcome.finish,
                    entry_id=running.entry_id,
                    finished_at=time.time(),
                )
            await self._redis.xack(self.stream, JOBS_GROUP, running.entry_id)
            if outcome is not None:
                self.metrics.finished(outcome.state)
                self._log_finished(running, outcome)
        except asyncio.CancelledError:
            log(
                logger, "job_interrupted", logging.WARNING, job_id=job.id, entry_id=running.entry_id
            )
            raise
        except EngineDead as exc:  # left pending: another worker continues it
            if self.failure is None:
                self.failure = str(exc)
                log(logger, "engine_dead", logging.ERROR, job_id=job.id, error=str(exc))
            self.request_stop()
        except Exception as exc:  # Redis failed under us: leave the entry pending for a retry
            log(
                logger,
                "job_crashed",
                logging.ERROR,
                job_id=job.id,
                error=repr(exc),
                exc=traceback.format_exc(),
            )
        finally:
            self._jobs.pop(job.id, None)

    async def _execute(self, running: _Running) -> _Outcome | None:
        """Publish the job's events up to its terminal one; None when there is nothing to do."""
        job, settings = running.job, self.settings
        remembers = job.memory and job.messages is not None
        prefix = ""

        async def remember(text: str, finish: FinishReason) -> None:
            await self._remember(job, prefix + text, finish)

        pub = JobPublisher(
            self._sessions,
            job,
            model=settings.model,
            window_ms=settings.batch_window_ms,
            on_end=remember if remembers else None,
        )
        record = await get_record(self._redis, self.keys, job.id)
        if record.get("state") in TERMINAL_STATES and record.get("entry_id") == running.entry_id:
            # Redelivered after its worker finished it but died before acknowledging.
            log(logger, "job_already_finished", job_id=job.id, state=record["state"])
            return None
        if record.get("cancel_requested") or running.cancel_requested:
            await pub.end("cancelled")
            return _Outcome("cancelled", "cancelled")
        if job.deadline is not None and job.deadline < time.time():
            await pub.error("deadline_exceeded", "the job's deadline passed before it could run")
            return _Outcome("failed", "deadline_exceeded")
        attempts = int(await self._redis.hincrby(self.keys.job(job.id), "attempts", 1))
        if attempts > settings.max_attempts:
            return await self._give_up(running, pub, attempts)
        await set_state(
            self._redis,
            self.keys,
            job.id,
            "running",
            settings.job_ttl_s,
            worker=self.consumer,
            entry_id=running.entry_id,
            session_id=job.session_id,
            model=settings.model,
            started_at=time.time(),
        )
        raw_prefix = await self._redis.get(self.keys.job_text(job.session_id, job.id))
        prefix = raw_prefix.decode() if isinstance(raw_prefix, bytes) else (raw_prefix or "")
        history = await self._conversations.load(job.session_id) if remembers else []
        # A continued answer gets no second StreamStart: the client sees one answer.
        if not prefix:
            await pub.start(attempt=attempts - 1)
        log(
            logger,
            "job_started",
            job_id=job.id,
            session_id=job.session_id,
            attempt=attempts - 1,
            continued_chars=len(prefix),
            history=len(history),
        )
        try:
            return await self._stream(running, pub, prefix, history)
        finally:
            await pub.aclose()

    async def _remember(self, job: Job, answer: str, finish: FinishReason) -> None:
        if finish == "cancelled" and not answer:
            return  # stopped before it said anything: nothing to remember
        assert job.messages is not None
        exchange = Exchange(
            job_id=job.id, messages=tuple(job.messages), answer=answer, finish_reason=finish
        )
        await self._conversations.remember(job.session_id, exchange)

    async def _stream(
        self,
        running: _Running,
        pub: JobPublisher,
        prefix: str,
        history: list[Exchange],
    ) -> _Outcome:
        job = running.job
        if running.cancel_requested:  # cancelled while the job was being set up
            await pub.end("cancelled")
            return _Outcome("cancelled", "cancelled")
        first_token_s: float | None = None
        last_t: float | None = None  # engine time of the last token
        deltas: AsyncIterator[EngineDelta] | None = None
        finished = False
        try:
            deltas = self.engine.generate(job, prefix=prefix, history=history)
            while True:
                try:
                    delta = await anext(deltas)
                except StopAsyncIteration:
                    log(logger, "engine_no_finish", logging.WARNING, job_id=job.id)
                    await pub.end("stop")
                    finished = True
                    return _Outcome("done", "stop", pub.published_tokens, first_token_s)
                if running.cancel_requested and not running.abort_repeated:
                    # A cancel that came before the engine knew the job: repeat it now.
                    running.abort_repeated = True
                    await self.engine.abort(job.id)
                if first_token_s is None and delta.tokens:
                    first_token_s = time.monotonic() - running.started
                if delta.tokens:
                    last_t = self._count_tokens(delta, last_t, job, continued=bool(prefix))
                await pub.add(delta)
                if delta.finish_reason is not None:
                    finished = True
                    state: JobState = "cancelled" if delta.finish_reason == "cancelled" else "done"
                    return _Outcome(state, delta.finish_reason, pub.published_tokens, first_token_s)
        except EngineError as exc:
            if pub.ended:
                raise
            finished = True
            await pub.error(exc.code, exc.message)
            return _Outcome("failed", exc.code, pub.published_tokens, first_token_s)
        except (RedisError, asyncio.CancelledError, EngineDead):
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
            return _Outcome("failed", "engine_error", pub.published_tokens, first_token_s)
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    await self.engine.abort(job.id)
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _count_tokens(
        self, delta: EngineDelta, last_t: float | None, job: Job, *, continued: bool
    ) -> float:
        """Metrics of a delta with tokens; returns its time, the next one's ``last_t``."""
        m = self.metrics
        m.tokens.inc(delta.tokens)
        if last_t is not None:
            m.itl.observe(max(0.0, delta.t - last_t) / delta.tokens)
        elif not continued:  # a continued answer's first token was an earlier attempt's
            m.ttft.observe(max(0.0, delta.t - job.created_at))
        return delta.t

    async def _give_up(self, running: _Running, pub: JobPublisher, attempts: int) -> _Outcome:
        job = running.job
        reason = (
            f"job was attempted {attempts - 1} times; the limit is {self.settings.max_attempts}"
        )
        await dead_letter(
            self._redis,
            self.keys,
            maxlen=self.settings.dead_maxlen,
            stream=self.stream,
            entry_id=running.entry_id,
            fields=running.fields,
            code="too_many_attempts",
            reason=reason,
            job_id=job.id,
            session_id=job.session_id,
        )
        await pub.error("too_many_attempts", reason)
        return _Outcome("failed", "too_many_attempts")

    def _log_finished(self, running: _Running, outcome: _Outcome) -> None:
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
