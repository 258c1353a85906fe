"""Turns client prompts into jobs on the jobs stream, refusing what cannot be served."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from typing import cast

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import ApiError, from_validation
from gateway.requests import PromptRequest
from shared.autopipeline import AutoPipeline
from shared.codec import text
from shared.jobs import (
    claim_idempotency_key,
    enqueue,
    idempotent_job_id,
    named_job,
    queue_depth,
    release_idempotency_key,
)
from shared.keys import Keys
from shared.protocol import Job
from shared.settings import Settings
from shared.wire import Wire

#: HTTP header that carries a job request's idempotency key (the body's ``idempotency_key``
#: field, and a WebSocket prompt's, say the same).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Answer header of a job request that an earlier one with the same key already made.
REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_FIELD = "idempotency_key"
MAX_IDEMPOTENCY_KEY_CHARS = 200


@dataclass(frozen=True, slots=True)
class Submitted:
    """What became of a job request."""

    job: Job
    #: An earlier request with the same idempotency key made the job; nothing was enqueued now.
    replayed: bool = False
    #: The job's state: "queued" for a new job, its record's state for a replayed one.
    state: str = "queued"


def checked_idempotency_key(value: str, param: str) -> str:
    """``value`` when it can be an idempotency key, else a 400 naming ``param``."""
    problem = None
    if not value:
        problem = "must not be empty"
    elif len(value) > MAX_IDEMPOTENCY_KEY_CHARS:
        problem = f"must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
    elif not value.isprintable():
        problem = "must hold printable characters only"
    if problem is not None:
        raise ApiError(400, "invalid_request", f"{param}: {problem}", param=param)
    return value


def request_digest(request: PromptRequest, model: str) -> str:
    """A hash of what the request asks for (its key aside): equal for equal requests."""
    asked = request.model_dump(mode="json", exclude={"type", "idempotency_key"})
    asked["model"] = model
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


#: Seconds a reading of a model's heartbeat or queue depth answers later job POSTs.
FRESH_S = 0.5


class Intake:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        # Jobs posted in the same tick (a burst) share the enqueue's round trip, on a
        # connection of its own (shared.wire: no redis-py machinery per trip).
        self._wire = Wire(settings.redis_url)
        self._calls = AutoPipeline(self._wire)
        # A job POST is one round trip (the enqueue) while the checks before it can be answered
        # from what this gateway read moments ago: a model's last heartbeat (only ever a
        # lower bound of the real one) and a queue depth far below its limit, plus the jobs
        # enqueued here since. Near the limit, or once a reading is old, Redis is asked again.
        self._alive: dict[str, tuple[float, float]] = {}  # model: (heartbeat, read at)
        self._depth: dict[str, tuple[int, float]] = {}  # model: (depth + enqueued since, read at)

    async def aclose(self) -> None:
        await self._wire.aclose()

    async def live_models(self) -> dict[str, float]:
        """Models some worker announced recently, with the time it last did."""
        since = time.time() - 3 * self._settings.heartbeat_s
        rows = cast(
            list[tuple[bytes, float]],
            await self._redis.zrangebyscore(self._keys.models, since, "+inf", withscores=True),
        )
        return {m.decode(): float(t) for m, t in rows}

    async def check_model(self, model: str) -> None:
        oldest = time.time() - 3 * self._settings.heartbeat_s
        cached = self._alive.get(model)
        if cached is not None and cached[0] >= oldest and time.monotonic() - cached[1] < FRESH_S:
            return
        seen = await self._redis.zscore(self._keys.models, model)
        if seen is None:
            raise ApiError(404, "model_not_found", f"no worker has ever served model '{model}'")
        if seen < oldest:
            raise ApiError(503, "no_worker", f"no live worker serves model '{model}' right now")
        self._alive[model] = (seen, time.monotonic())

    async def submit(self, session_id: str, request: PromptRequest) -> Job:
        """Enqueue ``request`` as a new job (its idempotency key, if any, is honoured)."""
        return (await self.accept(session_id, request)).job

    async def accept(
        self, session_id: str, request: PromptRequest, *, idempotency_key: str | None = None
    ) -> Submitted:
        """Enqueue ``request``, or, when its idempotency key (``idempotency_key``, from the
        HTTP header, or the request's own field) already names a job on this session, answer
        with that job and enqueue nothing. The same key for another request is a 409.
        """
        key = self._idempotency_key(idempotency_key, request.idempotency_key)
        model = request.model or self._settings.default_model
        job = self._job(session_id, request, model)
        if key is None:
            await self._check_capacity(model)
            await self._enqueue(job, model)
            return Submitted(job)
        key_text, param = key
        digest = request_digest(request, model)
        job = job.model_copy(update={"id": idempotent_job_id(session_id, key_text, digest)})
        # A repeat is answered before the capacity checks: its job exists, whatever the queue.
        earlier = await named_job(self._redis, self._keys, session_id, key_text)
        if earlier is not None:
            return await self._replay(job, earlier, param)
        await self._check_capacity(model)
        # Shielded: a client that gives up mid-request (and retries) must find the key either
        # naming a job that is enqueued or free again, never naming one that never will be.
        return await asyncio.shield(self._enqueue_once(job, model, key_text, param))

    async def _check_capacity(self, model: str) -> None:
        await self.check_model(model)
        limit = self._settings.max_queue_depth
        cached = self._depth.get(model)
        if cached is not None and cached[0] < limit // 2 and time.monotonic() - cached[1] < FRESH_S:
            return
        depth = await queue_depth(self._redis, self._keys, model)
        if depth >= limit:
            raise ApiError(429, "overloaded", f"the queue for '{model}' is full; retry later")
        self._depth[model] = (depth, time.monotonic())

    @staticmethod
    def _idempotency_key(header: str | None, field: str | None) -> tuple[str, str] | None:
        """The request's key and where it came from (for error messages), or None."""
        if header is not None:
            checked_idempotency_key(header, IDEMPOTENCY_HEADER)
            if field is not None and field != header:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"{IDEMPOTENCY_FIELD}: differs from the {IDEMPOTENCY_HEADER} header",
                    param=IDEMPOTENCY_FIELD,
                )
            return header, IDEMPOTENCY_HEADER
        if field is not None:
            return checked_idempotency_key(field, IDEMPOTENCY_FIELD), IDEMPOTENCY_FIELD
        return None

    async def _enqueue_once(self, job: Job, model: str, key: str, param: str) -> Submitted:
        """Enqueue ``job`` unless ``key`` names a job already; one ``SET NX`` decides."""
        r, keys = self._redis, self._keys
        ttl_s = self._settings.idempotency_ttl_s
        earlier = await claim_idempotency_key(r, keys, job.session_id, key, job.id, ttl_s)
        if earlier is not None:  # another request with this key won the race
            return await self._replay(job, earlier, param)
        try:
            # The key was free, but its job may still be known: the key expired before the job's
            # record did, or a failover lost it. Then that job stands; it is not enqueued twice.
            state = await r.hget(keys.job(job.id), "state")
            if state is not None:
                return Submitted(job, replayed=True, state=text(state))
            await self._enqueue(job, model)
        except BaseException:
            with contextlib.suppress(RedisError):
                await release_idempotency_key(r, keys, job.session_id, key)
            raise
        return Submitted(job)

    async def _replay(self, job: Job, earlier: str, param: str) -> Submitted:
        """The answer to a request whose key already names job ``earlier``."""
        if earlier != job.id:  # the id derives from the request: this one asks for another job
            raise ApiError(
                409,
                "idempotency_conflict",
                f"{param}: this key was used on this session for a different request; "
                "send a new key for a new job",
                param=param,
            )
        state = await self._redis.hget(self._keys.job(job.id), "state")
        # No record yet: the request that won the key is enqueueing the job right now.
        return Submitted(job, replayed=True, state=text(state) if state else "queued")

    def _job(self, session_id: str, request: PromptRequest, model: str) -> Job:
        """The job ``request`` asks for, or the error that says why it cannot be one."""
        s = self._settings
        try:
            job = request.to_job(session_id, model)
        except ValidationError as exc:
            raise from_validation(exc) from exc
        if job.prompt_chars() > s.max_prompt_chars:
            raise ApiError(
                413, "prompt_too_large", f"prompt is longer than {s.max_prompt_chars} characters"
            )
        if job.max_tokens is not None and job.max_tokens > s.max_tokens_limit:
            raise ApiError(
                400,
                "max_tokens_too_large",
                f"max_tokens may be at most {s.max_tokens_limit}",
                param="max_tokens",
            )
        return job

    async def _enqueue(self, job: Job, model: str) -> None:
        s = self._settings
        cached = self._depth.get(model)
        if cached is not None:  # counted as queued until the next reading says otherwise
            self._depth[model] = (cached[0] + 1, cached[1])
        await enqueue(
            self._calls,
            self._keys,
            job,
            model=model,
            jobs_maxlen=s.jobs_maxlen,
            job_ttl_s=s.job_ttl_s,
        )
