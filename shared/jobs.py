"""Job records and intake: what any service (gateway, CLI, tests) uses to enqueue or cancel."""

from __future__ import annotations

import time
from typing import Literal, TypeAlias

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.codec import JobEncoding, encode_job, text
from shared.keys import JOBS_GROUP, Keys
from shared.protocol import Job

JobState: TypeAlias = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


async def enqueue(
    redis: Redis,
    keys: Keys,
    job: Job,
    *,
    model: str,
    jobs_maxlen: int,
    job_ttl_s: int,
    encoding: JobEncoding = "json",
) -> str:
    """Record ``job`` as queued and append it to ``model``'s jobs stream; returns the entry id."""
    record = keys.job(job.id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            record,
            mapping={
                "state": "queued",
                "session_id": job.session_id,
                "model": model,
                "attempts": 0,
                "created_at": job.created_at,
                "updated_at": time.time(),
            },
        )
        pipe.expire(record, job_ttl_s)
        pipe.xadd(
            keys.jobs_stream(model),
            encode_job(job, encoding),  # type: ignore[arg-type]
            maxlen=jobs_maxlen,
            approximate=True,
        )
        results = await pipe.execute()
    entry_id = results[-1]
    return text(entry_id)


async def queue_depth(redis: Redis, keys: Keys, model: str) -> int:
    """Jobs in ``model``'s stream not yet handed to a worker."""
    stream = keys.jobs_stream(model)
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return 0
    for group in groups:
        if text(group.get("name")) == JOBS_GROUP:
            lag = group.get("lag")
            if lag is not None:
                return int(lag)
    return int(await redis.xlen(stream))


async def set_state(
    redis: Redis, keys: Keys, job_id: str, state: JobState, ttl_s: int, **fields: str | int | float
) -> None:
    record = keys.job(job_id)
    mapping: dict[str | bytes, str | int | float] = {"state": state, "updated_at": time.time()}
    mapping.update(fields)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(record, mapping=mapping)  # type: ignore[arg-type]
        pipe.expire(record, ttl_s)
        await pipe.execute()


async def get_record(redis: Redis, keys: Keys, job_id: str) -> dict[str, str]:
    raw = await redis.hgetall(keys.job(job_id))
    return {text(k): text(v) for k, v in raw.items()}


async def request_cancel(
    redis: Redis, keys: Keys, job_id: str, *, reason: str = "client", ttl_s: int = 86_400
) -> None:
    """Ask whichever worker holds ``job_id`` to stop it (any service may write this entry).

    The flag on the record stops a job still queued: a worker checks it before running one.
    The record keeps a TTL even if it had expired already, so a late cancel leaks nothing.
    """
    record = keys.job(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(record, "cancel_requested", reason)
        pipe.expire(record, ttl_s)
        pipe.xadd(
            keys.control,
            {"action": "cancel", "job_id": job_id, "reason": reason},
            maxlen=10_000,
            approximate=True,
        )
        await pipe.execute()
