"""The control stream: entries (cancel) that every worker reads, each acting on its own jobs.

A plain XREAD, not a consumer group: the worker running a job is not known to the writer, so
every worker must see every entry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.codec import text
from shared.keys import Keys
from shared.logs import log
from workers.intake import stream_entries

logger = logging.getLogger("tokenbus.worker.control")

OnCancel = Callable[[str, str], Awaitable[None]]


async def control_tail(redis: Redis, keys: Keys) -> str:
    """Id to read the control stream after: its last entry now, so old entries are skipped.

    Taken once at start-up (not "$" on every read, which would drop entries written between
    two reads).
    """
    last = await redis.xrevrange(keys.control, count=1)
    return text(last[0][0]) if last and last[0][0] is not None else "0-0"


async def read_control(
    redis: Redis,
    keys: Keys,
    *,
    after: str,
    block_ms: int,
    on_cancel: OnCancel,
    stop: asyncio.Event,
) -> None:
    """Read control entries after ``after`` until ``stop``, calling ``on_cancel(job_id, reason)``.

    Ends by the flag, not by cancellation alone: on Python 3.11 redis-py can swallow a
    CancelledError (``asyncio.wait_for`` in its send path), which would loop on forever.
    """
    while not stop.is_set():
        try:
            reply = await redis.xread({keys.control: after}, count=100, block=max(block_ms, 1))
        except RedisError as exc:
            log(logger, "control_read_failed", logging.WARNING, error=repr(exc))
            await asyncio.sleep(1.0)
            continue
        for entry_id, fields in stream_entries(reply):
            after = entry_id
            entry = {text(k): text(v) for k, v in fields.items()}
            if entry.get("action") == "cancel" and entry.get("job_id"):
                try:
                    await on_cancel(entry["job_id"], entry.get("reason", ""))
                except Exception as exc:  # one failed cancel must not stop the next ones
                    log(
                        logger,
                        "cancel_failed",
                        logging.ERROR,
                        job_id=entry["job_id"],
                        error=repr(exc),
                    )
