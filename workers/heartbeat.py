"""Heartbeats: how the gateway learns which models have live workers, and what each runs."""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis

from shared.keys import Keys


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
    info = json.dumps(
        {"model": model, "slots": slots, "running": running, "started_at": started_at}
    )
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.models, {model: time.time()})
        pipe.set(keys.worker(worker_id), info, px=max(1, round(3 * interval_s * 1000)))
        await pipe.execute()
