"""Heartbeats: how the gateway learns which models have live workers, and what each runs."""

from __future__ import annotations

import json
import time

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.client import Pipeline as SyncPipeline

from shared.keys import Keys


def _queue_beat(
    pipe: Pipeline | SyncPipeline,
    keys: Keys,
    *,
    worker_id: str,
    model: str,
    slots: int,
    running: int,
    started_at: float,
    interval_s: float,
) -> None:
    """The beat's commands, for either client: the model served now, and this worker's key,
    which outlives three missed beats, no more."""
    info = {"model": model, "slots": slots, "running": running, "started_at": started_at}
    pipe.zadd(keys.models, {model: time.time()})
    pipe.set(keys.worker(worker_id), json.dumps(info), px=max(1, round(3 * interval_s * 1000)))


async def beat(
    redis: Redis,
    keys: Keys,
    *,
    worker_id: str,
    model: str,
    slots: int,
    running: int,
    started_at: float,
    interval_s: float,
) -> None:
    """Announce ``model`` as served now, and what this worker runs."""
    async with redis.pipeline(transaction=False) as pipe:
        _queue_beat(
            pipe,
            keys,
            worker_id=worker_id,
            model=model,
            slots=slots,
            running=running,
            started_at=started_at,
            interval_s=interval_s,
        )
        await pipe.execute()


def beat_sync(
    redis: SyncRedis,
    keys: Keys,
    *,
    worker_id: str,
    model: str,
    slots: int,
    running: int,
    started_at: float,
    interval_s: float,
) -> None:
    """``beat`` from a thread (workers.lease_keeper): a busy event loop never looks dead."""
    pipe = redis.pipeline(transaction=False)
    _queue_beat(
        pipe,
        keys,
        worker_id=worker_id,
        model=model,
        slots=slots,
        running=running,
        started_at=started_at,
        interval_s=interval_s,
    )
    pipe.execute()
