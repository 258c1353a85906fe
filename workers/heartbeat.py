"""Heartbeats: how the gateway learns which models have live workers, and what each runs."""

from __future__ import annotations

import json
import time

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from shared.keys import Keys


def _info(model: str, slots: int, running: int, started_at: float) -> str:
    return json.dumps(
        {"model": model, "slots": slots, "running": running, "started_at": started_at}
    )


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
    """Announce ``model`` as served now; the worker key outlives three missed beats, no more."""
    info = _info(model, slots, running, started_at)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.models, {model: time.time()})
        pipe.set(keys.worker(worker_id), info, px=max(1, round(3 * interval_s * 1000)))
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
    pipe.zadd(keys.models, {model: time.time()})
    pipe.set(
        keys.worker(worker_id),
        _info(model, slots, running, started_at),
        px=max(1, round(3 * interval_s * 1000)),
    )
    pipe.execute()
