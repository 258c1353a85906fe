"""Redis clients with timeouts, pool sizes and retries that suit each use."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import BusyLoadingError, DataError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from shared.settings import Settings

#: Seconds a command may wait for a free pooled connection before failing.
POOL_WAIT_S = 10.0
#: Retries of a command that failed on its connection (a stale pooled one after a restart, or
#: Redis loading its AOF): enough to reconnect, short enough that a request during an outage
#: fails in well under a second (the gateway answers 503) instead of hanging.
RETRIES = 3
#: Errors that a new connection, a moment later, may not meet (BusyLoadingError is "LOADING").
RETRY_ON = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)


class _Connection(Connection):
    """redis.asyncio's TCP connection, packing commands with hiredis as the synchronous client
    does when hiredis is installed (the asyncio one packs in Python: redis-py issue #4176).

    A publish script call has ~15 arguments: 18 us to pack in Python, 8 us with hiredis, for
    the same bytes; a busy worker packs tens of thousands a second.
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        try:
            packed: list[bytes] = self._packer.pack(*args)  # type: ignore[arg-type]
            return packed
        except DataError:  # a type hiredis refuses: redis-py's own encoder says what is wrong
            return super().pack_command(*args)


def connect(settings: Settings, *, block_ms: int = 0, retries: int = RETRIES) -> Redis:
    """A client for ``settings.redis_url``.

    redis-py 8 gives every read a 5 s socket timeout; a client that issues ``BLOCK`` reads
    passes its block time so the timeout always outlasts the block. The pool is bounded and
    blocking: hundreds of concurrent jobs wait for a connection instead of failing with
    "Too many connections" (the default pool raises past 100).

    The retry is redis.asyncio's own ``Retry``: the synchronous one, accepted just the same,
    never retries an async command. ``retries=0`` is for a pub/sub client, which must see a
    lost connection: redis-py would otherwise reconnect and resubscribe silently, and what was
    published in between would be missed unnoticed.
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=5.0 + block_ms / 1000.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        connection_class=_Connection,  # a rediss:// or unix:// URL picks its own class
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries, supported_errors=RETRY_ON
        ),
    )
    return Redis.from_pool(pool)
