"""Intake helpers any service uses: enqueue, queue depth, cancel."""

from __future__ import annotations

from redis.asyncio import Redis

from shared.jobs import enqueue, queue_depth, request_cancel
from shared.keys import JOBS_GROUP, Keys
from shared.protocol import Job


async def test_cancel_of_an_unknown_job_leaves_a_bounded_record(redis: Redis, keys: Keys) -> None:
    await request_cancel(redis, keys, "job-gone", reason="test", ttl_s=60)
    assert await redis.hget(keys.job("job-gone"), "cancel_requested") == b"test"
    assert 0 < await redis.ttl(keys.job("job-gone")) <= 60
    entries = await redis.xrange(keys.control)
    assert entries is not None
    assert entries[-1][1] == {b"action": b"cancel", b"job_id": b"job-gone", b"reason": b"test"}


async def test_queue_depth_counts_jobs_not_yet_handed_to_a_worker(redis: Redis, keys: Keys) -> None:
    assert await queue_depth(redis, keys, "m") == 0
    for _ in range(3):
        job = Job(session_id="s1", prompt="hi")
        await enqueue(redis, keys, job, model="m", jobs_maxlen=100, job_ttl_s=60)
    assert await queue_depth(redis, keys, "m") == 3  # no group yet: the stream's length
    await redis.xgroup_create(keys.jobs_stream("m"), JOBS_GROUP, id="0")
    await redis.xreadgroup(JOBS_GROUP, "c1", {keys.jobs_stream("m"): ">"}, count=2)
    assert await queue_depth(redis, keys, "m") == 1  # two were delivered
