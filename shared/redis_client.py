"""Redis clients with timeouts that suit each use."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from shared.settings import Settings


def connect(settings: Settings, *, block_ms: int = 0) -> Redis:
    """A client for ``settings.redis_url``.

    redis-py 8 gives every read a 5 s socket timeout; a client that issues ``BLOCK`` reads
    passes its block time so the timeout always outlasts the block.
    """
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=5.0 + block_ms / 1000.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3),
        max_connections=None,
    )
