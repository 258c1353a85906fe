"""The OpenAI-compatible routes, through the official ``openai`` client."""

from __future__ import annotations

import time

import openai
import pytest
from openai import AsyncOpenAI
from redis.asyncio import Redis

from shared.keys import Keys
from shared.settings import Settings
from tests.servers import running_gateway, running_worker


async def test_models_lists_what_live_workers_serve(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    # A model whose worker stopped beating long ago is not listed.
    await redis.zadd(keys.models, {"gone": time.time() - 3600})
    async with running_worker(settings), running_gateway(settings) as base:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == [settings.model]
        assert models.data[0].owned_by == "tokenbus" and models.data[0].object == "model"
        one = await client.models.retrieve(settings.model)
        assert one.id == settings.model
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("gone")
        assert caught.value.status_code == 404
        body = caught.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found"
        await client.close()
