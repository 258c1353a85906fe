from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.settings import Settings
from tests.redis_server import test_redis

if TYPE_CHECKING:
    from tests.engine_thread import ThreadedEngine


#: Numbers worth seeing in every run (CI's log included), printed after the test summary.
REPORT: list[str] = []


def report(line: str) -> None:
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("tokenbus numbers")
        for line in REPORT:
            terminalreporter.write_line(line)


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


#: The model name the tiny test model is served under (and its jobs stream).
TINY_MODEL = "tiny"


@pytest.fixture(scope="session")
def tiny_engine(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[ThreadedEngine]:
    """One real vLLM engine on a tiny random model, built offline, for the whole session."""
    from tests.engine_thread import ThreadedEngine
    from tests.tiny_model import build_tiny_model
    from workers.vllm_engine import VllmEngine

    started = time.monotonic()
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    built = time.monotonic()
    engine_settings = Settings(
        redis_url=redis_url,
        engine="vllm",
        model=TINY_MODEL,
        model_path=str(folder),
        worker_slots=32,
        cpu_kv_cache_gib=1,
    )
    engine = ThreadedEngine(VllmEngine(engine_settings))
    engine.run(engine.inner.start())
    report(
        f"tiny vLLM engine: model built in {built - started:.1f} s, "
        f"engine started in {time.monotonic() - built:.1f} s"
    )
    yield engine
    engine.shutdown()
