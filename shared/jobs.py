"""Job records and intake: what any service (gateway, CLI, tests) uses to enqueue or cancel."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Literal, TypeAlias

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT

from shared.autopipeline import AutoPipeline
from shared.codec import JobEncoding, encode_job, text
from shared.keys import JOBS_GROUP, Keys
from shared.protocol import Job

JobState: TypeAlias = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


async def enqueue(
    redis: Redis | AutoPipeline,
    keys: Keys,
    job: Job,
    *,
    model: str,
    jobs_maxlen: int,
    job_ttl_s: int,
    encoding: JobEncoding = "json",
) -> str:
    """Record ``job`` as queued and append it to ``model``'s jobs stream; returns the entry id.

    One transaction: never a record without its entry, or an entry without its record. Given
    an ``AutoPipeline`` (the gateway's), jobs posted at once share a round trip.
    """
    calls = redis if isinstance(redis, AutoPipeline) else AutoPipeline(redis)
    record = keys.job(job.id)
    fields: list[EncodableT] = []
    for name, value in encode_job(job, encoding).items():
        fields += [name, value]
    replies = await calls.transaction(
        (
            "HSET",
            record,
            "state",
            "queued",
            "session_id",
            job.session_id,
            "model",
            model,
            "attempts",
            0,
            "created_at",
            job.created_at,
            "updated_at",
            time.time(),
        ),
        ("EXPIRE", record, job_ttl_s),
        ("XADD", keys.jobs_stream(model), "MAXLEN", "~", jobs_maxlen, "*", *fields),
    )
    return text(replies[-1])


def idempotent_job_id(session_id: str, key: str, request_digest: str) -> str:
    """The job id an idempotency key names: the same session, key and request give the same id.

    The request's digest is part of it, so a key reused for another request (once the first use
    expired) names another job; so is the session id, so one key on two sessions names two jobs.
    """
    seed = "\n".join((session_id, key, request_digest)).encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(seed).digest()[:18]  # 144 bits: as unguessable as the session id
    return "job_" + base64.urlsafe_b64encode(digest).decode("ascii")


async def claim_idempotency_key(
    redis: Redis, keys: Keys, session_id: str, key: str, job_id: str, ttl_s: int
) -> str | None:
    """Remember that ``key`` names ``job_id`` on the session, unless it already names a job.

    One ``SET NX GET`` (Redis 7): of any number of requests racing with one key, on any
    gateways, exactly one gets None (it enqueues); every other gets the job id the key names.
    """
    name = keys.session_idempotency(session_id, key)
    earlier = await redis.set(name, job_id, nx=True, get=True, ex=ttl_s)
    return None if earlier is None else text(earlier)


async def named_job(redis: Redis, keys: Keys, session_id: str, key: str) -> str | None:
    """The job id ``key`` names on the session, if it names one."""
    earlier = await redis.get(keys.session_idempotency(session_id, key))
    return None if earlier is None else text(earlier)


async def release_idempotency_key(redis: Redis, keys: Keys, session_id: str, key: str) -> None:
    """Forget ``key`` (its job could not be enqueued): a retry with it enqueues anew."""
    await redis.delete(keys.session_idempotency(session_id, key))


async def queue_depth(redis: Redis, keys: Keys, model: str) -> int:
    """Jobs in ``model``'s stream not yet handed to a worker."""
    stream = keys.jobs_stream(model)
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return 0
    for group in groups:
        if text(group.get("name")) == JOBS_GROUP:
            lag = group.get("lag")
            if lag is not None:
                return int(lag)
    return int(await redis.xlen(stream))


def _state_fields(state: JobState, fields: dict[str, str | int | float]) -> list[EncodableT]:
    """A record's new state as HSET field, value pairs: the state, when, and ``fields``."""
    pairs: list[EncodableT] = ["state", state, "updated_at", time.time()]
    for name, value in fields.items():
        pairs += [name, value]
    return pairs


async def set_state(
    redis: Redis, keys: Keys, job_id: str, state: JobState, ttl_s: int, **fields: str | int | float
) -> None:
    record = keys.job(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(record, items=_state_fields(state, fields))
        pipe.expire(record, ttl_s)
        await pipe.execute()


#: Running, unless cancelled while queued (then untouched): one round trip, one decision.
_MARK_RUNNING = """
if redis.call('HEXISTS', KEYS[1], 'cancel_requested') == 1 then
  return redis.call('HGET', KEYS[1], 'cancel_requested')
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return false
"""


async def mark_running(
    calls: AutoPipeline,
    keys: Keys,
    job_id: str,
    ttl_s: int,
    *,
    within: float = 0.0,
    **fields: str | int | float,
) -> str | None:
    """Set the job's state to running, unless a cancel came first: then its reason, untouched.

    One script where reading the record and then writing it took two round trips; jobs that
    start in the same tick share one, and ``within`` lets it ride with the job's first publish.
    """
    args = [ttl_s, *_state_fields("running", fields)]
    reason = await calls.script(_MARK_RUNNING, [keys.job(job_id)], args, within=within)
    return None if reason is None else text(reason)


async def settle(
    calls: AutoPipeline,
    keys: Keys,
    job_id: str,
    state: JobState,
    ttl_s: int,
    *,
    stream: str,
    entry_id: str,
    within: float = 0.0,
    **fields: str | int | float,
) -> None:
    """Record how the job ended, then acknowledge its entry, in that order, in one round trip
    (shared with the other jobs that end in the same tick; ``within`` seconds, with whatever
    round trip goes next).

    State before ack: an entry redelivered after a crash in between finds the record (and the
    lease) done, and is only acknowledged.
    """
    record = keys.job(job_id)
    pairs = _state_fields(state, {"entry_id": entry_id, **fields})
    await asyncio.gather(
        calls.call("HSET", record, *pairs, within=within),
        calls.call("EXPIRE", record, ttl_s, within=within),
        calls.call("XACK", stream, JOBS_GROUP, entry_id, within=within),
    )


async def get_record(redis: Redis, keys: Keys, job_id: str) -> dict[str, str]:
    raw = await redis.hgetall(keys.job(job_id))
    return {text(k): text(v) for k, v in raw.items()}


async def request_cancel(
    redis: Redis, keys: Keys, job_id: str, *, reason: str = "client", ttl_s: int = 86_400
) -> None:
    """Ask whichever worker holds ``job_id`` to stop it (any service may write this entry).

    The flag on the record stops a job still queued: a worker checks it before running one.
    The record keeps a TTL even if it had expired already, so a late cancel leaks nothing.
    """
    record = keys.job(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(record, "cancel_requested", reason)
        pipe.expire(record, ttl_s)
        pipe.xadd(
            keys.control,
            {"action": "cancel", "job_id": job_id, "reason": reason},
            maxlen=10_000,
            approximate=True,
        )
        await pipe.execute()
