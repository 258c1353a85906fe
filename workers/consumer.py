"""The worker: takes jobs from its model's stream as it has free slots and runs each on the engine.

Lifecycle (``WorkerState``): STARTING → RUNNING → DRAINING → STOPPED. RUNNING reads new
entries and, every ``reclaim_interval_s``, entries whose lease lapsed (workers.recovery);
each job runs in its own task (workers.runner). DRAINING (SIGTERM) reads nothing more, lets
running jobs finish for up to ``worker_drain_s`` and hands the rest back to other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time

from redis.exceptions import RedisError, ResponseError

from shared.autopipeline import AutoPipeline
from shared.codec import BadJob, decode_job
from shared.conversation import Conversations
from shared.keys import JOBS_GROUP, Keys
from shared.lease import Leases
from shared.logs import log
from shared.protocol import Job
from shared.redis_client import connect
from shared.settings import Settings
from shared.stream.publish import SessionPublisher
from shared.wire import Wire
from workers.batcher import PublishBatcher
from workers.control import control_tail, read_control
from workers.deadletter import refuse
from workers.engine import Engine, EngineDelta
from workers.engines import make_engine
from workers.heartbeat import Beat, beat, beat_sync
from workers.intake import Fields, check_limits, stream_entries, usable_ids
from workers.lease_keeper import LeaseKeeper
from workers.metrics import WorkerMetrics
from workers.recovery import Recovery
from workers.runner import JobRunner, Running

logger = logging.getLogger("tokenbus.worker")


class WorkerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """Consumes ``keys.jobs_stream(settings.model)`` in group ``JOBS_GROUP`` until stopped."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        drain_timeout_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.engine = engine if engine is not None else make_engine(settings)
        self.consumer = settings.worker_id or default_worker_id()
        self.stream = self.keys.jobs_stream(settings.model)
        self.drain_timeout_s = (
            settings.worker_drain_s if drain_timeout_s is None else drain_timeout_s
        )
        #: This worker's Prometheus metrics (its own registry).
        self.metrics = WorkerMetrics()
        self.redis = connect(settings)
        # Blocking reads get a client whose socket timeout outlasts BLOCK.
        self._blocking = connect(settings, block_ms=settings.block_ms)
        # New jobs are read on a connection of their own (a BLOCK holds it): one read per job
        # at low rates, so without redis-py's per-command machinery (shared.wire).
        self._jobs_wire = Wire(settings.redis_url, timeout_s=5.0 + settings.block_ms / 1000)

        #: Jobs' bookkeeping commands (leases, records, acks) issued in one tick share a trip,
        #: on a connection of its own (shared.wire: no redis-py machinery per trip).
        self._wire = Wire(settings.redis_url)
        self.calls = AutoPipeline(self._wire)
        self.sessions = SessionPublisher(
            self.redis,
            self.keys,
            history_maxlen=settings.history_maxlen,
            ttl_s=settings.history_ttl_s,
            calls=self.calls,
        )
        self.batcher = PublishBatcher(
            self.sessions,
            max_window_ms=settings.batch_window_ms,
            hold_s=settings.outage_hold_s,
        )
        self.leases = Leases(
            self.redis,
            self.keys,
            ttl_s=settings.lease_ttl_s,
            keep_s=settings.history_ttl_s,
            calls=self.calls,
        )
        self.conversations = Conversations.from_settings(self.redis, self.keys, settings)
        self.recovery = Recovery(self)
        self.keeper = LeaseKeeper(
            settings.redis_url,
            self.keys,
            stream=self.stream,
            consumer=self.consumer,
            ttl_ms=self.leases.ttl_ms,
            stall_s=max(10.0, 5 * settings.lease_ttl_s),
            on_lost=self._lease_lost,
            beat=lambda client: beat_sync(client, self.keys, self._beat_now()),
            beat_s=settings.heartbeat_s,
        )
        self.state = WorkerState.NEW
        self._jobs: dict[str, Running] = {}
        self._tasks: dict[asyncio.Task[None], Running] = {}
        self._aborts: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._closing = asyncio.Event()  # ends the control, heartbeat and renewal loops
        #: Set once start() has joined the group and announced the model.
        self.ready = asyncio.Event()
        self._control_after = "0-0"
        self._started_at = time.time()
        self._in_run = False
        self._last_reclaim = 0.0
        #: Why the worker stopped on its own (its engine died); None after a requested stop.
        self.failure: str | None = None

    @property
    def running(self) -> int:
        """Slots taken: jobs picked up and not yet finished."""
        return len(self._tasks)

    def _enter(self, state: WorkerState, *allowed_from: WorkerState) -> None:
        if self.state not in allowed_from:
            raise RuntimeError(f"worker cannot go from {self.state.value} to {state.value}")
        self.state = state

    # Lifecycle

    async def start(self) -> None:
        """Join the group, start the engine, announce the model. run() calls it if needed."""
        if self.state is not WorkerState.NEW:
            return
        self._enter(WorkerState.STARTING, WorkerState.NEW)
        await self._ensure_group()
        self._control_after = await control_tail(self.redis, self.keys)
        await self.engine.start()
        await self._beat()
        self._enter(WorkerState.RUNNING, WorkerState.STARTING)
        self.ready.set()
        log(
            logger,
            "worker_ready",
            model=self.settings.model,
            slots=self.settings.worker_slots,
            consumer=self.consumer,
            engine=self.engine.name,
            lease_ttl_s=self.settings.lease_ttl_s,
        )

    async def run(self) -> None:
        """Run until stop(): read jobs, then drain the running ones and close the engine."""
        self._in_run = True
        background: list[asyncio.Task[None]] = []
        try:
            await self.start()
            self.keeper.start()
            background = [
                asyncio.create_task(self._control_loop(), name="worker-control"),
            ]
            await self._read_loop()
            self._enter(WorkerState.DRAINING, WorkerState.RUNNING)
            await self._drain()
        finally:
            await self._hand_back_all()
            self._closing.set()
            # Cancelling only hastens them: they also end by the flag within one BLOCK.
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.keeper.stop()
            await self._shutdown()
            self.state = WorkerState.STOPPED
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

    def _lease_lost(self, job_id: str, fence: str) -> None:
        """The keeper found a job's lease moved on: stop that attempt, publish nothing more."""
        running = self._jobs.get(job_id)
        if running is None or running.fence is None or running.fence.token != fence:
            return  # that attempt already ended
        running.lease_lost = True
        log(logger, "lease_lost", logging.WARNING, job_id=job_id, fence=fence)
        task = asyncio.create_task(self.engine.abort(job_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    def engine_died(self, error: str, job_id: str) -> None:
        """A job saw its engine die: the worker stops, leaving its jobs to others."""
        if self.failure is None:
            self.failure = error
            log(logger, "engine_dead", logging.ERROR, job_id=job_id, error=error)
        self.request_stop()

    async def _shutdown(self) -> None:
        try:
            await self.engine.close()
        except Exception as exc:
            log(logger, "engine_close_failed", logging.ERROR, error=repr(exc))
        with contextlib.suppress(RedisError):
            await self.redis.delete(self.keys.worker(self.consumer))
        await self.batcher.close()
        await self._wire.aclose()
        await self._jobs_wire.aclose()
        await self._blocking.aclose()
        await self.redis.aclose()
        log(logger, "worker_stopped", consumer=self.consumer)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log(logger, "worker_draining", running=len(self._tasks), deadline_s=self.drain_timeout_s)
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_timeout_s)
        if pending:
            log(logger, "drain_timeout", logging.WARNING, handing_back=len(pending))

    async def _hand_back_all(self) -> None:
        """Stop every job still running here, then give each back for another worker."""
        if not self._tasks:
            return
        left = list(self._tasks.values())
        # Cancel again while any remain: redis-py on Python 3.11 can swallow a cancel.
        for _ in range(10):
            if not self._tasks:
                break
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(set(self._tasks), timeout=1.0)
        # Only now: a job still publishing could otherwise slip a batch in after the release.
        for running in left:
            try:
                await self.recovery.hand_back(running)
            except RedisError as exc:  # the lease lapses instead
                log(
                    logger,
                    "hand_back_failed",
                    logging.WARNING,
                    job_id=running.job.id,
                    error=repr(exc),
                )

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # Reading jobs

    async def _read_loop(self) -> None:
        reclaim_s = self.settings.reclaim_interval_s
        block_ms = max(1, min(self.settings.block_ms, int(reclaim_s * 1000)))
        failures = 0
        while not self._stopping.is_set():
            free = self.settings.worker_slots - len(self._tasks)
            if free <= 0:
                # No await since counting: a slot freed meanwhile would have been seen.
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                entries = []
                now = time.monotonic()
                if now - self._last_reclaim >= reclaim_s:
                    self._last_reclaim = now
                    entries = await self.recovery.reclaim(free)
                if not entries:
                    command: tuple[str | int, ...] = ("XREADGROUP", "GROUP", JOBS_GROUP)
                    command += (self.consumer, "COUNT", free, "BLOCK", block_ms)
                    command += ("STREAMS", self.stream, ">")
                    (read,) = await self._jobs_wire.execute([command])
                    entries = stream_entries(await read)
                failures = 0
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted under us, or Redis restarted without its data.
                with contextlib.suppress(RedisError):
                    await self._ensure_group()
                continue
            except RedisError as exc:
                failures += 1
                delay = min(0.1 * 2**failures, 2.0)
                log(logger, "jobs_read_failed", logging.WARNING, error=repr(exc), retry_s=delay)
                await asyncio.sleep(delay)
                continue
            for entry_id, fields in entries:
                await self._dispatch(entry_id, fields)

    async def _dispatch(self, entry_id: str, fields: Fields) -> None:
        try:
            job = decode_job(fields)
            check_limits(job, self.settings)
        except BadJob as bad:
            job_id, session_id = usable_ids(bad)
            await self._refuse(entry_id, fields, bad.code, bad.reason, job_id, session_id)
            return
        here = self._jobs.get(job.id)
        if here is not None:
            if here.entry_id != entry_id:
                # The same job enqueued twice: the running one stands, this one is recorded.
                with contextlib.suppress(RedisError):  # left pending: seen again later
                    await self.duplicate(job.id, entry_id, of="running")
            return  # our own entry, reclaimed while we run it: nothing to do
        running = Running(job, entry_id, fields)
        self._jobs[job.id] = running
        task = asyncio.create_task(self._run_job(running), name=f"job-{job.id}")
        self._tasks[task] = running
        self.metrics.jobs_running.inc()
        task.add_done_callback(self._job_done)

    async def _run_job(self, running: Running) -> None:
        self.keeper.take_entry(running.entry_id)
        try:
            await JobRunner(self, running).run()
        finally:
            self.keeper.drop_entry(running.entry_id)
            if self._jobs.get(running.job.id) is running:
                del self._jobs[running.job.id]

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self.metrics.jobs_running.dec()
        self._slot_freed.set()

    async def duplicate(self, job_id: str, entry_id: str, *, of: str) -> None:
        """Acknowledge another entry of a job that runs or ran, and count it on the record.

        Counted only by the worker whose XACK took it: under load two workers can hold the same
        entry for a moment (one read it, the other reclaimed it), and both get here.
        """
        if not await self.redis.xack(self.stream, JOBS_GROUP, entry_id):
            return
        log(logger, "job_duplicate", job_id=job_id, entry_id=entry_id, of=of)
        self.metrics.finished("duplicate")
        record = self.keys.job(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(record, "duplicates", 1)
            pipe.hset(record, "last_duplicate_entry", entry_id)
            pipe.expire(record, self.settings.job_ttl_s)
            await pipe.execute()

    async def _refuse(
        self,
        entry_id: str,
        fields: Fields,
        code: str,
        reason: str,
        job_id: str | None,
        session_id: str | None,
    ) -> None:
        self.metrics.finished("refused")
        await refuse(
            self.redis,
            self.keys,
            self.sessions,
            self.settings,
            stream=self.stream,
            entry_id=entry_id,
            fields=fields,
            code=code,
            reason=reason,
            job_id=job_id,
            session_id=session_id,
        )

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

    def _beat_now(self) -> Beat:
        return Beat(
            worker_id=self.consumer,
            model=self.settings.model,
            slots=self.settings.worker_slots,
            running=len(self._tasks),
            started_at=self._started_at,
            interval_s=self.settings.heartbeat_s,
        )

    async def _beat(self) -> None:
        await beat(self.redis, self.keys, self._beat_now())

    def count_tokens(
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
