"""The dead-letter stream: where entries a worker cannot run go, with the reason, losing nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from shared.codec import text
from shared.jobs import set_state
from shared.keys import JOBS_GROUP, Keys
from shared.logs import log
from shared.protocol import Error
from shared.settings import Settings
from shared.stream.publish import SessionPublisher
from workers.intake import fields_json

logger = logging.getLogger("tokenbus.worker")


async def dead_letter(
    redis: Redis,
    keys: Keys,
    *,
    maxlen: int,
    stream: str,
    entry_id: str,
    fields: Mapping[bytes | str, bytes | str],
    code: str,
    reason: str,
    job_id: str | None = None,
    session_id: str | None = None,
) -> str:
    """Append the entry (raw fields kept as JSON) and why it was refused; returns the new id."""
    record: dict[FieldT, EncodableT] = {
        "stream": stream,
        "entry_id": entry_id,
        "code": code,
        "reason": reason,
        "entry": fields_json(fields),
        "t": time.time(),
    }
    if job_id:
        record["job_id"] = job_id
    if session_id:
        record["session_id"] = session_id
    new_id = await redis.xadd(keys.dead_letter, record, maxlen=maxlen, approximate=True)
    return text(new_id)


async def refuse(
    redis: Redis,
    keys: Keys,
    sessions: SessionPublisher,
    settings: Settings,
    *,
    stream: str,
    entry_id: str,
    fields: Mapping[bytes | str, bytes | str],
    code: str,
    reason: str,
    job_id: str | None,
    session_id: str | None,
) -> None:
    """Dead-letter an entry, then acknowledge it and tell its session (when one is known)."""
    log(
        logger,
        "bad_entry",
        logging.WARNING,
        entry_id=entry_id,
        code=code,
        reason=reason,
        job_id=job_id,
        session_id=session_id,
    )
    try:
        await dead_letter(
            redis,
            keys,
            maxlen=settings.dead_maxlen,
            stream=stream,
            entry_id=entry_id,
            fields=fields,
            code=code,
            reason=reason,
            job_id=job_id,
            session_id=session_id,
        )
        await redis.xack(stream, JOBS_GROUP, entry_id)
        if session_id:
            error = Error(code=code, message=reason, job_id=job_id)
            await sessions.publish(session_id, [error], job_id=job_id or "_")
        if job_id:
            await set_state(redis, keys, job_id, "failed", settings.job_ttl_s, error=code)
    except RedisError as exc:  # left pending (a retry refuses it again); never stops the loop
        log(logger, "bad_entry_failed", logging.ERROR, entry_id=entry_id, error=repr(exc))
