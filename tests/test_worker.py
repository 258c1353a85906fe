"""The worker against a real Redis, driven the way another service would drive it: raw XADDs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from shared.conversation import Exchange
from shared.jobs import get_record, request_cancel
from shared.keys import JOBS_GROUP, Keys
from shared.protocol import TERMINAL_TYPES, Job
from shared.settings import Settings
from shared.stream.position import HISTORY_FIELD
from shared.stream.publish import SessionPublisher
from tests.dying_engine import DiesAfter
from workers.batcher import PublishBatcher
from workers.consumer import Worker
from workers.engine import EngineDelta, EngineError
from workers.publisher import JobPublisher
from workers.synthetic import SyntheticEngine, synthetic_text

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # a failsafe for hung tests, never a speed requirement

StartWorker = Callable[..., Awaitable[Worker]]


# Helpers


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


def as_text(value: bytes | str | None) -> str:
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value


async def read_stream(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """A stream's entries, ids and fields as text."""
    out: list[tuple[str, dict[str, str]]] = []
    for entry_id, fields in await redis.xrange(key) or []:
        assert fields is not None
        out.append((as_text(entry_id), {as_text(k): as_text(v) for k, v in fields.items()}))
    return out


async def history(redis: Redis, keys: Keys, session_id: str) -> list[dict[str, Any]]:
    entries = await read_stream(redis, keys.session_history(session_id))
    return [json.loads(fields[HISTORY_FIELD]) for _, fields in entries]


async def job_events(
    redis: Redis, keys: Keys, session_id: str, job_id: str
) -> list[dict[str, Any]]:
    """The session's events once ``job_id`` has its terminal event."""
    events: list[dict[str, Any]] = []

    async def ended() -> bool:
        nonlocal events
        events = await history(redis, keys, session_id)
        return any(e["type"] in TERMINAL_TYPES and e.get("job_id") == job_id for e in events)

    await wait_until(ended, f"the end of {job_id}")
    return events


async def pending(redis: Redis, keys: Keys, settings: Settings) -> int:
    info = await redis.xpending(keys.jobs_stream(settings.model), JOBS_GROUP)
    return int(info["pending"])


async def settled(redis: Redis, keys: Keys, settings: Settings) -> None:
    """Wait until every delivered entry is acknowledged."""

    async def none_pending() -> bool:
        return await pending(redis, keys, settings) == 0

    await wait_until(none_pending, "no pending entries")


def entry(fields: dict[str, bytes | str]) -> dict[FieldT, EncodableT]:
    return dict(fields.items())


async def xadd_json(redis: Redis, keys: Keys, settings: Settings, job: dict[str, Any]) -> None:
    await redis.xadd(keys.jobs_stream(settings.model), {"job": json.dumps(job)})


def deltas_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "delta"]


def answer(job: dict[str, Any], n_tokens: int) -> str:
    return "".join(synthetic_text(Job.model_validate(job), n_tokens))


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[StartWorker]:
    """Start in-process workers (settings overridable); stop them all at the end."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(engine: Any = None, **overrides: Any) -> Worker:
        worker = Worker(settings.model_copy(update=overrides), engine)
        task = asyncio.create_task(worker.run())
        running.append((worker, task))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, task}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # raises what start() failed with
        assert worker.ready.is_set()
        return worker

    yield start
    for worker, task in running:
        await asyncio.wait_for(worker.stop(), WAIT_S)
        await task


# Jobs end to end


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_job_streams_start_deltas_end(
    encoding: str, settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await start_worker()
    sid, jid = f"sess-{encoding}", f"job-{encoding}"
    job = {"v": 1, "id": jid, "session_id": sid, "prompt": "tell me a story please"}
    payload = json.dumps(job) if encoding == "json" else msgpack.packb(job)
    await redis.xadd(keys.jobs_stream(settings.model), {"job": payload})

    events = await job_events(redis, keys, sid, jid)
    n = settings.synthetic_tokens
    assert [e["type"] for e in events[:1]] == ["stream_start"]
    assert events[0]["job_id"] == jid and events[0]["model"] == settings.model
    assert events[0]["attempt"] == 0
    assert events[-1]["type"] == "stream_end"
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": n,
        "total_tokens": n + 5,
    }
    deltas = deltas_of(events)
    assert len(deltas) == len(events) - 2
    assert "".join(d["delta"] for d in deltas) == answer(job, n)
    assert sum(d["tokens"] for d in deltas) == n
    assert all(d["job_id"] == jid for d in deltas)
    assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["epoch"] for e in events}) == 1

    await settled(redis, keys, settings)
    record = await get_record(redis, keys, jid)
    assert record["state"] == "done"
    assert record["attempts"] == "1"
    assert record["session_id"] == sid
    assert as_text(await redis.get(keys.job_text(sid, jid))) == answer(job, n)


async def test_first_delta_alone_then_coalesced(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await start_worker(synthetic_tokens=200, synthetic_tokens_per_s=20_000, batch_window_ms=50)
    job = {"id": "job-batch", "session_id": "sess-batch", "prompt": "p"}
    await xadd_json(redis, keys, settings, job)

    events = await job_events(redis, keys, "sess-batch", "job-batch")
    deltas = deltas_of(events)
    first = synthetic_text(Job.model_validate(job), 1)[0]
    assert (deltas[0]["delta"], deltas[0]["tokens"]) == (first, 1)
    assert len(deltas) < 200
    assert sum(d["tokens"] for d in deltas) == 200
    assert "".join(d["delta"] for d in deltas) == answer(job, 200)
    stamps = [d["t"] for d in deltas]
    assert stamps == sorted(stamps)


async def test_publisher_flushes_a_trailing_batch_without_a_next_token(
    settings: Settings, keys: Keys, redis: Redis
) -> None:
    sessions = SessionPublisher(redis, keys, history_maxlen=100, ttl_s=60)
    job = Job(id="job-pub", session_id="sess-pub", prompt="p")
    batcher = PublishBatcher(sessions, max_window_ms=20, hold_s=5)
    pub = JobPublisher(batcher, job, model="m")
    await pub.start()
    await pub.add(EngineDelta("a", 1, 1.0))
    await pub.add(EngineDelta(" b", 1, 2.0))
    await pub.add(EngineDelta(" c", 1, 3.0))

    async def batch_out() -> bool:
        return len(await history(redis, keys, "sess-pub")) == 3

    await wait_until(batch_out, "the trailing batch")  # nothing more is added meanwhile
    await pub.add(EngineDelta(" d", 1, 4.0, finish_reason="stop"))
    events = await history(redis, keys, "sess-pub")
    assert [(e["type"], e.get("delta"), e.get("tokens")) for e in events] == [
        ("stream_start", None, None),
        ("delta", "a", 1),
        ("delta", " b c", 2),
        ("delta", " d", 1),
        ("stream_end", None, None),
    ]
    assert events[2]["t"] == 3.0
    # The last batch and StreamEnd went out in one script call: same history, one step.
    text = await redis.get(keys.job_text("sess-pub", "job-pub"))
    assert text == b"a b c d"
    with pytest.raises(RuntimeError):
        await pub.end("stop")
    await batcher.close()


# Bad entries


async def test_bad_entries_are_dead_lettered_and_the_stream_goes_on(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await start_worker(max_prompt_chars=100, max_tokens_limit=50)
    stream = keys.jobs_stream(settings.model)
    bad: list[tuple[dict[str, bytes | str], str]] = [
        ({"job": "this is not json at all"}, "bad_encoding"),
        ({"job": "{not json"}, "bad_encoding"),
        ({"job": json.dumps({"id": "job-nosess", "prompt": "hi"})}, "invalid_job"),
        (
            {
                "job": json.dumps(
                    {"id": "job-inv", "session_id": "sess-inv", "prompt": "hi", "max_tokens": 0}
                )
            },
            "invalid_job",
        ),
        ({"payload": "x"}, "bad_entry"),
        ({"job": msgpack.packb([1, 2, 3])}, "bad_entry"),
        ({"job": msgpack.packb({"session_id": "sess-mp", "id": "job-mp"})}, "invalid_job"),
        (
            {"job": json.dumps({"id": "job-big", "session_id": "sess-big", "prompt": "x" * 101})},
            "prompt_too_large",
        ),
        (
            {
                "job": json.dumps(
                    {"id": "job-mod", "session_id": "sess-mod", "prompt": "p", "model": "other"}
                )
            },
            "unknown_model",
        ),
        (
            {
                "job": json.dumps(
                    {"id": "job-mt", "session_id": "sess-mt", "prompt": "p", "max_tokens": 51}
                )
            },
            "max_tokens_too_large",
        ),
        (
            {"job": json.dumps({"id": "job-odd", "session_id": "odd }{ id", "prompt": "p"})},
            "invalid_job",
        ),
    ]
    entry_ids = [as_text(await redis.xadd(stream, entry(fields))) for fields, _ in bad]
    good = {"id": "job-good", "session_id": "sess-good", "prompt": "still works"}
    await xadd_json(redis, keys, settings, good)

    events = await job_events(redis, keys, "sess-good", "job-good")
    assert events[-1]["type"] == "stream_end"
    assert "".join(d["delta"] for d in deltas_of(events)) == answer(good, settings.synthetic_tokens)
    await settled(redis, keys, settings)

    dead = [fields for _, fields in await read_stream(redis, keys.dead_letter)]
    assert len(dead) == len(bad)
    for fields, (entry_fields, code), entry_id in zip(dead, bad, entry_ids, strict=True):
        assert fields["code"] == code
        assert fields["reason"]
        assert fields["stream"] == stream
        assert fields["entry_id"] == entry_id
        assert set(json.loads(fields["entry"])) == set(entry_fields)
    assert (dead[3]["session_id"], dead[3]["job_id"]) == ("sess-inv", "job-inv")
    assert "session_id" not in dead[2] and dead[2]["job_id"] == "job-nosess"
    assert "base64" in json.loads(dead[6]["entry"])["job"]
    # A session id that breaks the id rules names no keys: no event, no history for it.
    assert "session_id" not in dead[10] and dead[10]["job_id"] == "job-odd"
    assert await redis.exists(keys.session_history("odd }{ id")) == 0

    for sid, jid, code in [
        ("sess-inv", "job-inv", "invalid_job"),
        ("sess-mp", "job-mp", "invalid_job"),
        ("sess-big", "job-big", "prompt_too_large"),
        ("sess-mod", "job-mod", "unknown_model"),
        ("sess-mt", "job-mt", "max_tokens_too_large"),
    ]:
        events = await history(redis, keys, sid)
        assert [(e["type"], e["code"], e["job_id"]) for e in events] == [("error", code, jid)]
        assert events[0]["message"]
        assert (await get_record(redis, keys, jid))["state"] == "failed"
    assert "max_tokens" in (await history(redis, keys, "sess-inv"))[0]["message"]


# Slots


async def test_never_more_jobs_running_than_slots(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    jobs = [{"id": f"job-slot{i}", "session_id": f"sess-slot{i}", "prompt": "p"} for i in range(6)]
    for job in jobs:
        await xadd_json(redis, keys, settings, job)
    worker = await start_worker(worker_slots=2, synthetic_tokens=20, synthetic_tokens_per_s=200)

    most_pending = most_running = 0

    async def all_done() -> bool:
        nonlocal most_pending, most_running
        most_pending = max(most_pending, await pending(redis, keys, settings))
        states = [(await get_record(redis, keys, str(j["id"]))).get("state") for j in jobs]
        most_running = max(most_running, states.count("running"), worker.running)
        return states == ["done"] * len(jobs)

    await wait_until(all_done, "all six jobs")
    assert most_pending <= 2
    assert most_running <= 2
    assert max(most_pending, most_running) == 2  # the two slots were used at once
    for job in jobs:
        events = await history(redis, keys, str(job["session_id"]))
        assert events[-1]["type"] == "stream_end"
        assert "".join(d["delta"] for d in deltas_of(events)) == answer(job, 20)
    await settled(redis, keys, settings)


# Cancellation


async def test_cancel_mid_stream_frees_the_slot(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await start_worker(worker_slots=1, synthetic_tokens=500, synthetic_tokens_per_s=50)
    await xadd_json(redis, keys, settings, {"id": "job-c1", "session_id": "sess-c", "prompt": "p"})

    async def streaming() -> bool:
        return bool(deltas_of(await history(redis, keys, "sess-c")))

    await wait_until(streaming, "the first delta")
    await request_cancel(redis, keys, "job-c1")
    events = await job_events(redis, keys, "sess-c", "job-c1")
    end = events[-1]
    assert (end["type"], end["finish_reason"]) == ("stream_end", "cancelled")
    tokens = sum(d["tokens"] for d in deltas_of(events))
    assert 1 <= tokens < 500
    assert end["usage"]["completion_tokens"] == tokens
    await settled(redis, keys, settings)
    assert (await get_record(redis, keys, "job-c1"))["state"] == "cancelled"

    # One slot: a next job runs only because the cancelled one gave it back.
    nxt = {"id": "job-c2", "session_id": "sess-c", "prompt": "p", "max_tokens": 3}
    await xadd_json(redis, keys, settings, nxt)
    events = await job_events(redis, keys, "sess-c", "job-c2")
    assert (events[-1]["type"], events[-1]["finish_reason"]) == ("stream_end", "length")
    assert "".join(d["delta"] for d in deltas_of(events) if d["job_id"] == "job-c2") == answer(
        nxt, 3
    )


async def test_cancel_before_pickup_never_runs(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await request_cancel(redis, keys, "job-early")
    await xadd_json(
        redis, keys, settings, {"id": "job-early", "session_id": "sess-e", "prompt": "p"}
    )
    await start_worker()

    events = await job_events(redis, keys, "sess-e", "job-early")
    assert [(e["type"], e.get("finish_reason")) for e in events] == [("stream_end", "cancelled")]
    await settled(redis, keys, settings)
    record = await get_record(redis, keys, "job-early")
    assert record["state"] == "cancelled"
    assert "attempts" not in record
    assert await redis.get(keys.job_text("sess-e", "job-early")) is None


async def test_cancel_for_another_workers_job_is_ignored(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await start_worker()
    await redis.xadd(keys.control, {"action": "cancel", "job_id": "job-elsewhere"})
    await redis.xadd(keys.control, {"action": "reboot"})
    job = {"id": "job-after", "session_id": "sess-after", "prompt": "p"}
    await xadd_json(redis, keys, settings, job)
    events = await job_events(redis, keys, "sess-after", "job-after")
    assert events[-1]["finish_reason"] == "stop"


async def test_same_job_twice_at_once_runs_once(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    job = {"id": "job-twice", "session_id": "sess-twice", "prompt": "p"}
    await xadd_json(redis, keys, settings, job)
    await xadd_json(redis, keys, settings, job)  # read in the same batch as the first
    await start_worker(synthetic_tokens_per_s=100)

    events = await job_events(redis, keys, "sess-twice", "job-twice")
    await settled(redis, keys, settings)
    assert [e["type"] for e in events if e["type"] != "delta"] == ["stream_start", "stream_end"]
    assert "".join(d["delta"] for d in deltas_of(events)) == answer(job, settings.synthetic_tokens)
    # The second entry is acknowledged and recorded on the job, not dead-lettered or run.
    assert await read_stream(redis, keys.dead_letter) == []
    record = await get_record(redis, keys, "job-twice")
    assert record["state"] == "done" and record["duplicates"] == "1"


# Continuation, deadlines, attempts


async def test_continues_an_answer_already_published(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    job = {"id": "job-cont", "session_id": "sess-cont", "prompt": "p"}
    tokens = synthetic_text(Job.model_validate(job), settings.synthetic_tokens)
    prefix = "".join(tokens[:5])
    await redis.set(keys.job_text("sess-cont", "job-cont"), prefix)
    await xadd_json(redis, keys, settings, job)
    await start_worker()

    events = await job_events(redis, keys, "sess-cont", "job-cont")
    assert "stream_start" not in [e["type"] for e in events]  # one answer, continued
    published = "".join(d["delta"] for d in deltas_of(events))
    assert published == "".join(tokens[5:])
    assert events[-1]["usage"]["completion_tokens"] == settings.synthetic_tokens
    text = as_text(await redis.get(keys.job_text("sess-cont", "job-cont")))
    assert text == prefix + published == "".join(tokens)


async def test_deadline_in_the_past_is_an_error(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await start_worker()
    job = {"id": "job-late", "session_id": "sess-late", "prompt": "p", "deadline": time.time() - 5}
    await xadd_json(redis, keys, settings, job)
    events = await job_events(redis, keys, "sess-late", "job-late")
    assert [(e["type"], e.get("code")) for e in events] == [("error", "deadline_exceeded")]
    await settled(redis, keys, settings)
    assert (await get_record(redis, keys, "job-late"))["state"] == "failed"


async def test_too_many_attempts_goes_to_dead_letter(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    # As if max_attempts workers had each taken the job and died with it.
    lease = keys.job_lease("sess-t", "job-tired")
    await redis.hset(lease, mapping={"attempts": settings.max_attempts, "fence": 9})
    await xadd_json(
        redis, keys, settings, {"id": "job-tired", "session_id": "sess-t", "prompt": "p"}
    )
    await start_worker()
    events = await job_events(redis, keys, "sess-t", "job-tired")
    assert [(e["type"], e.get("code")) for e in events] == [("error", "too_many_attempts")]
    await settled(redis, keys, settings)
    dead = await read_stream(redis, keys.dead_letter)
    assert [(f["code"], f["job_id"]) for _, f in dead] == [("too_many_attempts", "job-tired")]


# Engine failures


class FlakyEngine(SyntheticEngine):
    """Synthetic, except for prompts that make it refuse or break after the first delta."""

    async def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        if job.prompt == "refuse":
            raise EngineError("prompt_too_long", "the prompt does not fit the context")
        async for delta in super().generate(job, prefix=prefix, history=history):
            yield delta
            if job.prompt == "explode":
                raise RuntimeError("GPU fell off the bus")


async def test_engine_errors_become_error_events(
    settings: Settings, keys: Keys, redis: Redis, start_worker: StartWorker
) -> None:
    await start_worker(FlakyEngine(settings))
    for name in ("refuse", "explode", "fine"):
        await xadd_json(
            redis, keys, settings, {"id": f"job-{name}", "session_id": f"s-{name}", "prompt": name}
        )

    refused = await job_events(redis, keys, "s-refuse", "job-refuse")
    assert [e["type"] for e in refused] == ["stream_start", "error"]
    assert (refused[-1]["code"], refused[-1]["job_id"]) == ("prompt_too_long", "job-refuse")
    exploded = await job_events(redis, keys, "s-explode", "job-explode")
    assert [e["type"] for e in exploded] == ["stream_start", "delta", "error"]
    assert exploded[-1]["code"] == "engine_error"
    assert "GPU fell off the bus" in exploded[-1]["message"]
    fine = await job_events(redis, keys, "s-fine", "job-fine")
    assert fine[-1]["finish_reason"] == "stop"
    await settled(redis, keys, settings)
    states = [(await get_record(redis, keys, f"job-{n}"))["state"] for n in ("refuse", "explode")]
    assert states == ["failed", "failed"]


# Heartbeat and process


async def test_heartbeat_announces_the_model_and_worker(
    settings: Settings, keys: Keys, redis: Redis
) -> None:
    worker = Worker(settings.model_copy(update={"worker_id": "w-beat", "worker_slots": 3}))
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), WAIT_S)
    assert await redis.zscore(keys.models, settings.model) is not None
    info = json.loads(await redis.get(keys.worker("w-beat")) or b"null")
    assert info["model"] == settings.model and info["slots"] == 3 and info["running"] == 0
    assert 0 < await redis.pttl(keys.worker("w-beat")) <= 3 * settings.heartbeat_s * 1000
    await asyncio.wait_for(worker.stop(), WAIT_S)
    await task
    assert await redis.exists(keys.worker("w-beat")) == 0


async def test_python_m_workers_runs_a_job_and_stops_on_sigterm(
    settings: Settings, keys: Keys, redis: Redis
) -> None:
    env = dict(os.environ)
    env.update(
        TOKENBUS_REDIS_URL=settings.redis_url,
        TOKENBUS_KEY_PREFIX=settings.key_prefix,
        TOKENBUS_ENGINE="synthetic",
        TOKENBUS_MODEL=settings.model,
        TOKENBUS_SYNTHETIC_TTFT_MS="5",
        TOKENBUS_SYNTHETIC_TOKENS_PER_S="2000",
        TOKENBUS_SYNTHETIC_TOKENS="12",
        TOKENBUS_BLOCK_MS="200",
        TOKENBUS_WORKER_ID="w-proc",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        job = {"id": "job-proc", "session_id": "sess-proc", "prompt": "p"}
        await xadd_json(redis, keys, settings, job)
        events = await job_events(redis, keys, "sess-proc", "job-proc")
        assert events[-1]["finish_reason"] == "stop"
        assert "".join(d["delta"] for d in deltas_of(events)) == answer(job, 12)
        await settled(redis, keys, settings)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    names = [line["event"] for line in lines]
    assert "worker_ready" in names and "job_finished" in names and "worker_stopped" in names
    ready = next(line for line in lines if line["event"] == "worker_ready")
    assert (ready["model"], ready["consumer"]) == (settings.model, "w-proc")


async def test_dead_engine_stops_the_worker_and_leaves_the_job_for_another(
    settings: Settings, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    worker = await start_worker(DiesAfter(SyntheticEngine(settings), 2))
    job = {"id": "job-orphan", "session_id": "sess-orphan", "prompt": "p"}
    await xadd_json(redis, keys, settings, job)

    async def failed() -> bool:
        return worker.failure is not None

    await wait_until(failed, "the worker to notice its engine died")
    assert worker.failure is not None and "engine process exited" in worker.failure
    await asyncio.wait_for(worker.stop(), WAIT_S)
    # Not acknowledged, no terminal event: the job is another worker's to continue.
    assert await pending(redis, keys, settings) == 1
    events = await history(redis, keys, "sess-orphan")
    assert events[0]["type"] == "stream_start"
    assert {e["type"] for e in events[1:]} == {"delta"}
    published = "".join(e["delta"] for e in events[1:])
    assert published and answer(job, 2).startswith(published)
