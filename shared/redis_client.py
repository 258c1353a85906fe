"""Redis clients with timeouts and pool sizes that suit each use."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from shared.settings import Settings

#: Seconds a command may wait for a free pooled connection before failing.
POOL_WAIT_S = 10.0


def connect(settings: Settings, *, block_ms: int = 0) -> Redis:
    """A client for ``settings.redis_url``.

    redis-py 8 gives every read a 5 s socket timeout; a client that issues ``BLOCK`` reads
    passes its block time so the timeout always outlasts the block. The pool is bounded and
    blocking: hundreds of concurrent jobs wait for a connection instead of failing with
    "Too many connections" (the default pool raises past 100).
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=5.0 + block_ms / 1000.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3),
    )
    return Redis.from_pool(pool)
