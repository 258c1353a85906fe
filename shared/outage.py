"""Riding out a Redis outage: which errors pass with time, and retrying through them.

A restart, a failover or an AOF load (``LOADING``) makes Redis refuse or drop connections for
seconds; a worker keeps its jobs through that by retrying the same call with backoff, up to a
bound past which the caller hands its work back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

T = TypeVar("T")

#: Errors that end when Redis is back (BusyLoadingError is a ConnectionError; READONLY is a
#: connection to a former master that a failover made a replica).
TRANSIENT: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


async def ride_out(call: Callable[[], Awaitable[T]], *, hold_s: float) -> T:
    """``await call()``, again on transient errors with backoff, for up to ``hold_s`` seconds.

    The last transient error is raised when the time is up. ``call`` must be safe to repeat
    (the publish script recognises a batch it already applied).
    """
    # The first try is a plain call: building tenacity's retry object for every publish and
    # lease call, though nothing failed, made reference cycles whose garbage collections
    # paused a busy worker for hundreds of milliseconds.
    try:
        return await call()
    except TRANSIENT:
        pass
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        stop=stop_after_delay(hold_s),
        wait=wait_random_exponential(multiplier=0.05, max=1.0),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover
