"""Heartbeats: how the gateway learns which models have live workers, and what each runs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.client import Pipeline as SyncPipeline

from shared.keys import Keys


@dataclass(frozen=True, slots=True)
class Beat:
    """What one heartbeat says of a worker."""

    worker_id: str
    model: str
    slots: int
    running: int
    started_at: float
    interval_s: float

    def queue(self, pipe: Pipeline | SyncPipeline, keys: Keys) -> None:
        """The beat's commands, for either client: the model served now, and this worker's
        key, which outlives three missed beats, no more."""
        info = {
            "model": self.model,
            "slots": self.slots,
            "running": self.running,
            "started_at": self.started_at,
        }
        pipe.zadd(keys.models, {self.model: time.time()})
        px = max(1, round(3 * self.interval_s * 1000))
        pipe.set(keys.worker(self.worker_id), json.dumps(info), px=px)


async def beat(redis: Redis, keys: Keys, now: Beat) -> None:
    """Announce the model as served now, and what this worker runs."""
    async with redis.pipeline(transaction=False) as pipe:
        now.queue(pipe, keys)
        await pipe.execute()


def beat_sync(redis: SyncRedis, keys: Keys, now: Beat) -> None:
    """``beat`` from a thread (workers.lease_keeper): a busy event loop never looks dead."""
    pipe = redis.pipeline(transaction=False)
    now.queue(pipe, keys)
    pipe.execute()
