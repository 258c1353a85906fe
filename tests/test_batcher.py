"""The worker's publish batcher on a real Redis: one round trip per tick, in order, fenced."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.keys import Keys, Lease
from shared.lease import Acquired, Leases
from shared.protocol import Job
from shared.stream.history import History
from shared.stream.publish import (
    MAX_BATCHES_PER_CALL,
    Batch,
    Published,
    SessionPublisher,
    StaleFence,
    encode_delta,
)
from workers.batcher import PublishBatcher
from workers.engine import EngineDelta
from workers.publisher import JobPublisher

pytestmark = pytest.mark.asyncio


async def history(redis: Redis, keys: Keys, session_id: str) -> list[dict[str, Any]]:
    snapshot = await History(redis, keys).read(session_id, 0)
    return [event for event, _raw in snapshot.events]


def publishers(batcher: PublishBatcher, n: int, tag: str) -> list[tuple[Job, JobPublisher]]:
    jobs = [Job(id=f"job-{tag}-{i}", session_id=f"sess-{tag}-{i}", prompt="p") for i in range(n)]
    return [(job, JobPublisher(batcher, job, model="m")) for job in jobs]


async def test_many_jobs_share_each_flush_and_keep_their_order(keys: Keys, redis: Redis) -> None:
    sessions = SessionPublisher(redis, keys, history_maxlen=100, ttl_s=60)
    batcher = PublishBatcher(sessions, max_window_ms=20, hold_s=5, saturate_jobs=8)
    pubs = publishers(batcher, 40, "many")
    await asyncio.gather(*(pub.start() for _, pub in pubs))
    for step in range(10):
        for _, pub in pubs:
            await pub.add(EngineDelta(f" w{step}", 1, float(step), token_ids=(step,)))
        await asyncio.sleep(0.005)
    await asyncio.gather(*(pub.end("stop") for _, pub in pubs))
    for job, _ in pubs:
        events = await history(redis, keys, job.session_id)
        assert events[0]["type"] == "stream_start" and events[-1]["type"] == "stream_end"
        assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
        deltas = [e for e in events if e["type"] == "delta"]
        assert "".join(d["delta"] for d in deltas) == "".join(f" w{s}" for s in range(10))
        assert sum(d["tokens"] for d in deltas) == 10
        assert deltas[0]["delta"] == " w0"  # the first token alone, at once
    # 40 jobs x (start, 10 tokens, end) went out in far fewer round trips than script calls.
    assert batcher.batches >= 40 * 3
    assert batcher.flushes < batcher.batches / 4
    # With 40 jobs per flush (more than saturate_jobs), the window is the longest allowed.
    assert batcher.window == pytest.approx(0.020)
    await batcher.close()


async def test_the_window_is_zero_for_a_lone_job(keys: Keys, redis: Redis) -> None:
    sessions = SessionPublisher(redis, keys, history_maxlen=100, ttl_s=60)
    batcher = PublishBatcher(sessions, max_window_ms=1000, hold_s=5, saturate_jobs=1000)
    ((job, pub),) = publishers(batcher, 1, "lone")
    await pub.start()
    for step in range(5):
        await pub.add(EngineDelta(f" w{step}", 1, float(step)))
        await asyncio.sleep(0.02)  # each token flushed alone: no 1 s window held it back
        assert len(await history(redis, keys, job.session_id)) == step + 2
    assert batcher.window <= 0.001
    await pub.end("stop")
    await batcher.close()


async def test_a_stale_fence_stops_only_its_own_job(keys: Keys, redis: Redis) -> None:
    sessions = SessionPublisher(redis, keys, history_maxlen=100, ttl_s=60)
    leases = Leases(redis, keys, ttl_s=5.0, keep_s=60)
    batcher = PublishBatcher(sessions, max_window_ms=5, hold_s=5)
    fenced = []
    for i in range(2):
        job = Job(id=f"job-fence-{i}", session_id=f"sess-fence-{i}", prompt="p")
        lease = await leases.acquire(
            job.session_id, job.id, owner="w1", entry_id="1-0", space="test"
        )
        assert isinstance(lease, Acquired)
        fenced.append((job, JobPublisher(batcher, job, model="m", fence=lease.fence)))
    for _, pub in fenced:
        await pub.start()
        await pub.add(EngineDelta("a", 1, 1.0, token_ids=(1,)))
    # Another worker takes job 0 over: its fence grows.
    (job0, pub0), (job1, pub1) = fenced
    await redis.hset(keys.job_lease(job0.session_id, job0.id), Lease.FENCE, "99")
    await pub0.add(EngineDelta(" b", 1, 2.0, token_ids=(2,)))
    await pub1.add(EngineDelta(" b", 1, 2.0, token_ids=(2,)))
    with pytest.raises(StaleFence):
        await pub0.end("stop")
    await pub1.end("stop")
    assert "".join(e.get("delta", "") for e in await history(redis, keys, job1.session_id)) == (
        "a b"
    )
    assert "".join(e.get("delta", "") for e in await history(redis, keys, job0.session_id)) == "a"
    await batcher.close()


async def test_closing_the_batcher_fails_whoever_waits(keys: Keys, redis: Redis) -> None:
    sessions = SessionPublisher(redis, keys, history_maxlen=100, ttl_s=60)
    batcher = PublishBatcher(sessions, max_window_ms=5, hold_s=5)
    await batcher.close()
    ((_, pub),) = publishers(batcher, 1, "closed")
    with pytest.raises(RuntimeError, match="closed"):
        await pub.start()


async def evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_flush_is_one_script_call_and_one_bad_batch_fails_alone(
    keys: Keys, redis: Redis
) -> None:
    sessions = SessionPublisher(redis, keys, history_maxlen=100, ttl_s=60)
    ids = [f"sess-one-call-{i}" for i in range(5)]
    await redis.set(keys.session_meta(ids[2]), "not a hash")  # WRONGTYPE for its HMGET
    batches = [Batch(sid, [encode_delta("j", sid, 1, 0.0)]) for sid in ids]
    await redis.config_resetstat()
    results = await sessions.publish_many(batches)
    assert await evalsha_calls(redis) == 1
    assert isinstance(results[2], ResponseError) and "WRONGTYPE" in str(results[2])
    for i in (0, 1, 3, 4):
        published = results[i]
        assert isinstance(published, Published) and published.offset == 1
        events = await history(redis, keys, ids[i])
        assert [e["delta"] for e in events] == [ids[i]]


async def test_batches_are_grouped_by_slot_and_capped_per_call(keys: Keys, redis: Redis) -> None:
    # On a cluster, a call may only touch one slot's keys: one call per slot in a flush.
    by_parity = SessionPublisher(
        redis, keys, history_maxlen=100, ttl_s=60, slot_of=lambda sid: int(sid[-1]) % 2
    )
    batches = [Batch(f"sess-slot-{i}", [encode_delta("j", "x", 1, 0.0)]) for i in range(6)]
    await redis.config_resetstat()
    results = await by_parity.publish_many(batches)
    assert await evalsha_calls(redis) == 2
    assert all(isinstance(r, Published) and r.offset == 1 for r in results)
    # A flush past MAX_BATCHES_PER_CALL takes more calls; results stay in the batches' order.
    one_node = SessionPublisher(redis, keys, history_maxlen=100, ttl_s=60)
    many = MAX_BATCHES_PER_CALL + 10
    batches = [Batch(f"sess-cap-{i % 7}", [encode_delta("j", str(i), 1, 0.0)]) for i in range(many)]
    await redis.config_resetstat()
    results = await one_node.publish_many(batches)
    assert await evalsha_calls(redis) == 2
    offsets: dict[str, int] = {}
    for batch, result in zip(batches, results, strict=True):
        offsets[batch.session_id] = offsets.get(batch.session_id, 0) + 1
        assert isinstance(result, Published) and result.offset == offsets[batch.session_id]
