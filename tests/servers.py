"""Gateways and workers for tests: in-process on real sockets, or as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import create_app
from shared.embedded_redis import free_port
from shared.settings import Settings
from workers.consumer import Worker
from workers.engine import Engine


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[str]:
    """The gateway app served on a free loopback port; yields its base URL."""
    runner = web.AppRunner(create_app(settings), handle_signals=False, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, engine: Engine | None = None) -> AsyncIterator[Worker]:
    """An in-process worker (on ``settings.engine`` unless given one), ready when yielded."""
    worker = Worker(settings, engine, drain_timeout_s=10.0)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 30)
    try:
        yield worker
    finally:
        await worker.stop()
        await task


@contextlib.asynccontextmanager
async def stack(
    settings: Settings, engine: Engine | None = None
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """A worker and a gateway; yields the gateway's base URL and an HTTP client."""
    async with (
        running_worker(settings, engine),
        running_gateway(settings) as base,
        aiohttp.ClientSession() as http,
    ):
        yield base, http


async def new_session(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.post(f"{base}/v1/sessions") as response:
        assert response.status == 201
        body: dict[str, Any] = await response.json()
        return body


def auth(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {session['token']}"}


async def post_job(
    http: aiohttp.ClientSession, session: dict[str, Any], body: dict[str, Any]
) -> str:
    async with http.post(session["jobs_url"], json=body, headers=auth(session)) as response:
        reply = await response.json()
        assert response.status == 202, reply
        job_id: str = reply["job_id"]
        return job_id


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[f"TOKENBUS_{name.upper()}"] = str(value)
    env.pop("REDIS_URL", None)
    return env


@contextlib.asynccontextmanager
async def gateway_process(settings: Settings) -> AsyncIterator[str]:
    """``python -m gateway`` as a separate process; yields its base URL once it is ready."""
    port = free_port()
    env = settings_env(settings)
    env["TOKENBUS_PORT"] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(f"{url}/readyz", proc)
        yield url
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(url)
