"""The dead-letter stream: where entries a worker cannot run go, with the reason, losing nothing."""

from __future__ import annotations

import time
from collections.abc import Mapping

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from shared.codec import text
from shared.keys import Keys
from workers.intake import fields_json


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
