from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.settings import Settings
from tests.redis_server import test_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with test_redis() as url:
        yield url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Fast settings on a key prefix of the test's own."""
    return Settings(
        redis_url=redis_url,
        key_prefix=f"tbt-{uuid.uuid4().hex[:10]}",
        secret="test-secret",
        engine="synthetic",
        model="synthetic",
        default_model="synthetic",
        synthetic_ttft_ms=5,
        synthetic_tokens_per_s=2000,
        synthetic_tokens=24,
        batch_window_ms=5,
        block_ms=500,
        heartbeat_s=0.5,
    )


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    # Leave a shared server (REDIS_URL) as we found it.
    async for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()
