"""Takeover of a running job by another worker, with real processes and real signals.

Worker A runs as ``python -m workers`` (so kill -9, SIGSTOP and SIGTERM are what they are in
production); worker B runs in-process on the synthetic engine, whose answer is a function of
the job alone: the client must see exactly ``synthetic_text(job, n)``, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.codec import text as text_of
from shared.conversation import Exchange
from shared.jobs import get_record
from shared.keys import JOBS_GROUP, Keys, Lease
from shared.lease import Acquired, Leases
from shared.protocol import Job
from shared.settings import Settings
from tests.servers import settings_env
from tests.test_lease import stored_ids
from tests.test_worker import (
    WAIT_S,
    StartWorker,
    answer,
    deltas_of,
    history,
    job_events,
    read_stream,
    settled,
    wait_until,
    xadd_json,
)
from workers.consumer import Worker
from workers.engine import EngineDelta
from workers.lease_keeper import LeaseKeeper
from workers.synthetic import SyntheticEngine, synthetic_text, token_id

ROOT = Path(__file__).resolve().parents[1]
N = 100  # tokens per answer: 2 s at the slow pace, so every signal lands mid-answer
SLOW = {"synthetic_tokens_per_s": 50.0, "synthetic_tokens": N, "synthetic_ttft_ms": 5.0}
#: B: the same answer (length), at full speed.
FAST = {"synthetic_tokens": N}


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[StartWorker]:
    """Start in-process workers (settings overridable); stop them all at the end."""
    started: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(engine: Any = None, **overrides: Any) -> Worker:
        worker = Worker(settings.model_copy(update=overrides), engine)
        task = asyncio.create_task(worker.run())
        started.append((worker, task))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, task}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # raises what start() failed with
        assert worker.ready.is_set()
        return worker

    yield start
    for worker, task in started:
        await asyncio.wait_for(worker.stop(), WAIT_S)
        await task


@dataclass
class WorkerProcess:
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines it wrote so far."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def names(self) -> list[str]:
        return [e["event"] for e in self.events()]

    async def wait_exit(self) -> int:
        async with asyncio.timeout(WAIT_S):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def worker_process(
    settings: Settings, tmp_path: Path, worker_id: str, **overrides: Any
) -> AsyncIterator[WorkerProcess]:
    """``python -m workers`` with ``settings`` (and ``overrides``); yields it once it is ready."""
    env = settings_env(settings.model_copy(update=overrides))
    env["TOKENBUS_WORKER_ID"] = worker_id
    log_path = tmp_path / f"{worker_id}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers", cwd=ROOT, env=env, stderr=log
        )
    worker = WorkerProcess(proc, log_path)
    try:

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"worker {worker_id} exited: {log_path.read_text()}")
            return "worker_ready" in worker.names()

        await wait_until(ready, f"worker {worker_id} to be ready")
        yield worker
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot die of SIGKILL
                proc.kill()
            await proc.wait()


async def wait_deltas(redis: Redis, keys: Keys, session_id: str, at_least: int) -> None:
    async def published() -> bool:
        return len(deltas_of(await history(redis, keys, session_id))) >= at_least

    await wait_until(published, f"{at_least} deltas on {session_id}")


async def snapshot(redis: Redis, keys: Keys, sid: str, jid: str) -> tuple[Any, ...]:
    """Everything a stale writer could touch on the session."""
    return (
        await history(redis, keys, sid),
        await redis.get(keys.job_text(sid, jid)),
        await redis.get(keys.job_token_ids(sid, jid)),
        await redis.hgetall(keys.session_meta(sid)),
    )


async def assert_one_exact_answer(
    redis: Redis, keys: Keys, job: dict[str, Any], n: int
) -> list[dict[str, Any]]:
    """The job's session shows one answer, nothing repeated or missing, usage counted once."""
    sid, jid = job["session_id"], job["id"]
    events = await job_events(redis, keys, sid, jid)
    types = [e["type"] for e in events]
    assert types.count("stream_start") == 1 and types[0] == "stream_start", types
    assert types[-1] == "stream_end" and types.count("stream_end") == 1, types
    assert set(types[1:-1]) == {"delta"}
    deltas = deltas_of(events)
    assert "".join(d["delta"] for d in deltas) == answer(job, n)
    assert sum(d["tokens"] for d in deltas) == n
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == n
    assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["epoch"] for e in events}) == 1
    # Beside the history: the whole answer's text and ids, once.
    tokens = synthetic_text(Job.model_validate(job), n)
    assert text_of(await redis.get(keys.job_text(sid, jid)) or b"") == "".join(tokens)
    ids = await stored_ids(redis, keys.job_token_ids(sid, jid))
    assert ids == [token_id(t) for t in tokens]
    return events


async def test_kill_9_mid_answer_another_worker_continues_it_exactly(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker, tmp_path: Path
) -> None:
    fast_lease = {"lease_ttl_s": 1.0, "reclaim_interval_s": 0.2}
    job = {"id": "job-kill", "session_id": "sess-kill", "prompt": "tell me everything"}
    async with worker_process(settings, tmp_path, "wa", **SLOW, **fast_lease) as a:
        await xadd_json(redis, keys, settings, job)
        await wait_deltas(redis, keys, "sess-kill", 3)
        os.kill(a.pid, signal.SIGKILL)  # no hand-back, no cleanup: the lease just lapses
        assert await a.wait_exit() == -signal.SIGKILL
    left = await history(redis, keys, "sess-kill")
    assert left[-1]["type"] == "delta"  # it died mid-answer

    await start_worker(worker_id="wb", **FAST, **fast_lease)
    events = await assert_one_exact_answer(redis, keys, job, N)
    assert events[: len(left)] == left  # what A published stands, untouched
    await settled(redis, keys, settings)
    record = await get_record(redis, keys, "job-kill")
    assert (record["state"], record["worker"], record["attempts"]) == ("done", "wb", "2")
    assert await read_stream(redis, keys.dead_letter) == []


async def test_a_worker_paused_past_its_lease_writes_nothing_after_takeover(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker, tmp_path: Path
) -> None:
    fast_lease = {"lease_ttl_s": 1.0, "reclaim_interval_s": 0.2}
    job = {"id": "job-stop", "session_id": "sess-stop", "prompt": "a long one"}
    async with worker_process(settings, tmp_path, "wa", **SLOW, **fast_lease) as a:
        await xadd_json(redis, keys, settings, job)
        await wait_deltas(redis, keys, "sess-stop", 3)
        os.kill(a.pid, signal.SIGSTOP)

        await start_worker(worker_id="wb", **FAST, **fast_lease)
        await assert_one_exact_answer(redis, keys, job, N)
        await settled(redis, keys, settings)
        after = await snapshot(redis, keys, "sess-stop", "job-stop")

        # A wakes with its job half done and its engine behind schedule: it learns that the
        # lease moved on (renewal or a refused publish) and drops the job.
        os.kill(a.pid, signal.SIGCONT)

        async def fenced() -> bool:
            return bool({"lease_lost", "job_fenced"} & set(a.names()))

        await wait_until(fenced, "worker A to find itself fenced")
        await asyncio.sleep(2.0)  # room for anything it might still try to write
        assert await snapshot(redis, keys, "sess-stop", "job-stop") == after
        assert "job_finished" not in a.names()
        assert await read_stream(redis, keys.dead_letter) == []
        record = await get_record(redis, keys, "job-stop")
        assert (record["state"], record["worker"]) == ("done", "wb")

        a.proc.send_signal(signal.SIGTERM)
        assert await a.wait_exit() == 0
    assert await snapshot(redis, keys, "sess-stop", "job-stop") == after
    await settled(redis, keys, settings)


async def test_sigterm_drains_then_hands_jobs_back_for_another_worker_at_once(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker, tmp_path: Path
) -> None:
    # A 30 s lease: only a hand-back, not a lapse, lets B in while the test runs.
    long_lease = {"lease_ttl_s": 30.0, "reclaim_interval_s": 0.2}
    jobs = [
        {"id": f"job-drain-{i}", "session_id": f"sess-drain-{i}", "prompt": f"p{i}"}
        for i in range(3)
    ]
    # Slower still: 5 s answers cannot end within A's 0.5 s drain, whatever the machine's load.
    slower = {**SLOW, "synthetic_tokens_per_s": 20.0}
    async with worker_process(
        settings, tmp_path, "wa", worker_drain_s=0.5, **slower, **long_lease
    ) as a:
        for job in jobs:
            await xadd_json(redis, keys, settings, job)
        for job in jobs:
            await wait_deltas(redis, keys, job["session_id"], 2)
        # B is up before A stops: with a live lease it must leave A's jobs alone.
        await start_worker(worker_id="wb", **FAST, **long_lease)
        a.proc.send_signal(signal.SIGTERM)
        assert await a.wait_exit() == 0
        names = a.names()
        assert "worker_draining" in names and "drain_timeout" in names
        handed = [e for e in a.events() if e["event"] == "job_handed_back"]
        assert sorted(e["job_id"] for e in handed) == [j["id"] for j in jobs]
        assert all(e["released"] for e in handed)
        assert names[-1] == "worker_stopped"

    for job in jobs:
        await assert_one_exact_answer(redis, keys, job, N)
        lease = await redis.hgetall(keys.job_lease(job["session_id"], job["id"]))
        got = {text_of(k): text_of(v) for k, v in lease.items()}
        assert (got[Lease.ATTEMPTS], got[Lease.HANDBACKS], got[Lease.DONE]) == ("2", "1", "1")
        record = await get_record(redis, keys, job["id"])
        assert (record["state"], record["worker"], record["attempts"]) == ("done", "wb", "2")
    await settled(redis, keys, settings)
    assert await read_stream(redis, keys.dead_letter) == []


class GatedEngine(SyntheticEngine):
    """Synthetic, except that every answer's last token waits for ``gate``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gate = asyncio.Event()

    async def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        deltas = super().generate(job, prefix=prefix, prefix_ids=prefix_ids, history=history)
        async for delta in deltas:
            if delta.finish_reason is not None:
                await self.gate.wait()
            yield delta


async def test_the_same_job_id_enqueued_twice_more_runs_once(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    n = 30
    job = {"id": "job-dup", "session_id": "sess-dup", "prompt": "once please"}
    engine = GatedEngine(settings.model_copy(update={"synthetic_tokens": n}))
    # One slot: A cannot read the second entry while it runs the first; B reads it.
    await start_worker(engine, worker_id="wa", worker_slots=1, synthetic_tokens=n)
    await xadd_json(redis, keys, settings, job)
    await wait_deltas(redis, keys, "sess-dup", 2)
    await start_worker(worker_id="wb", synthetic_tokens=n)
    await xadd_json(redis, keys, settings, job)  # while it runs, on A

    async def counted(times: int) -> bool:
        return (await get_record(redis, keys, "job-dup")).get("duplicates") == str(times)

    await wait_until(lambda: counted(1), "the first duplicate to be recorded")
    running = await history(redis, keys, "sess-dup")
    assert running[-1]["type"] == "delta"  # still running (the gate holds its last token)
    engine.gate.set()
    await assert_one_exact_answer(redis, keys, job, n)
    await settled(redis, keys, settings)
    finished = await snapshot(redis, keys, "sess-dup", "job-dup")

    await xadd_json(redis, keys, settings, job)  # after it finished
    await wait_until(lambda: counted(2), "the second duplicate to be recorded")
    await settled(redis, keys, settings)
    assert await snapshot(redis, keys, "sess-dup", "job-dup") == finished
    record = await get_record(redis, keys, "job-dup")
    assert (record["state"], record["worker"], record["attempts"]) == ("done", "wa", "1")
    assert await read_stream(redis, keys.dead_letter) == []


async def test_a_fenced_renewal_leaves_the_entry_with_its_new_holder(
    settings: Settings, keys: Keys, redis: Redis
) -> None:
    stream = keys.jobs_stream(settings.model)
    job = Job(id="job-renew", session_id="sess-renew", prompt="p")
    leases = Leases(redis, keys, ttl_s=0.3, keep_s=600)
    await redis.xgroup_create(stream, JOBS_GROUP, id="0", mkstream=True)
    entry_id = text_of(await redis.xadd(stream, {"job": job.model_dump_json()}))
    await redis.xreadgroup(JOBS_GROUP, "wa", {stream: ">"}, count=1)
    a = await leases.acquire(job.session_id, job.id, owner="wa", entry_id=entry_id, space="s")
    assert isinstance(a, Acquired)
    # A stalls; its lease lapses and B takes the job over, entry and lease.
    await asyncio.sleep(0.35)
    await redis.xclaim(stream, JOBS_GROUP, "wb", 0, [entry_id], justid=True)
    b = await leases.acquire(job.session_id, job.id, owner="wb", entry_id=entry_id, space="s")
    assert isinstance(b, Acquired)

    lost: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def keeper(consumer: str) -> LeaseKeeper:
        return LeaseKeeper(
            settings.redis_url,
            keys,
            stream=stream,
            consumer=consumer,
            ttl_ms=leases.ttl_ms,
            stall_s=10.0,
            on_lost=lambda job_id, fence: lost.put_nowait((consumer, fence)),
        )

    # A wakes up and renews what it thinks it holds: told it lost it, it must leave the entry
    # with B (re-claiming it would reset its idle time and move it to A's pending list).
    wa, wb = keeper("wa"), keeper("wb")
    wa.start()
    wb.start()
    try:
        wa.hold(job.session_id, job.id, a.fence.token, entry_id)
        wb.hold(job.session_id, job.id, b.fence.token, entry_id)
        async with asyncio.timeout(WAIT_S):
            assert await lost.get() == ("wa", a.fence.token)
        await asyncio.sleep(0.3)  # a few more renewals by B
        owners = await redis.xpending_range(stream, JOBS_GROUP, "-", "+", 10)
        assert [(text_of(p["consumer"]), text_of(p["message_id"])) for p in owners] == [
            ("wb", entry_id)
        ]
        assert lost.empty()  # B's renewals all held
        assert await leases.renew(job.session_id, job.id, owner="wb", fence=b.fence)
    finally:
        await wa.stop()
        await wb.stop()
