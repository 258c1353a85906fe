"""Turns client prompts into jobs on the jobs stream, refusing what cannot be served."""

from __future__ import annotations

import time
from typing import cast

from pydantic import ValidationError
from redis.asyncio import Redis

from gateway.errors import ApiError, from_validation
from gateway.requests import PromptRequest
from shared.jobs import enqueue, queue_depth
from shared.keys import Keys
from shared.protocol import Job
from shared.settings import Settings


class Intake:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings

    async def live_models(self) -> dict[str, float]:
        """Models some worker announced recently, with the time it last did."""
        since = time.time() - 3 * self._settings.heartbeat_s
        rows = cast(
            list[tuple[bytes, float]],
            await self._redis.zrangebyscore(self._keys.models, since, "+inf", withscores=True),
        )
        return {m.decode(): float(t) for m, t in rows}

    async def check_model(self, model: str) -> None:
        seen = await self._redis.zscore(self._keys.models, model)
        if seen is None:
            raise ApiError(404, "model_not_found", f"no worker has ever served model '{model}'")
        if seen < time.time() - 3 * self._settings.heartbeat_s:
            raise ApiError(503, "no_worker", f"no live worker serves model '{model}' right now")

    async def submit(self, session_id: str, request: PromptRequest) -> Job:
        s = self._settings
        model = request.model or s.default_model
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
        await self.check_model(model)
        if await queue_depth(self._redis, self._keys, model) >= s.max_queue_depth:
            raise ApiError(429, "overloaded", f"the queue for '{model}' is full; retry later")
        await enqueue(
            self._redis,
            self._keys,
            job,
            model=model,
            jobs_maxlen=s.jobs_maxlen,
            job_ttl_s=s.job_ttl_s,
        )
        return job
