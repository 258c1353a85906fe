"""Gateways and workers for tests: in-process on real sockets, or as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.app import create_app
from shared.embedded_redis import free_port
from shared.settings import Settings


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
