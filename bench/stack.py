"""The systems a fabric run measures, each started fresh on 127.0.0.1 for one run.

- :class:`TokenbusStack`: a private ``redis-server`` (nothing persisted), one gateway
  (``python -m gateway``) and ``workers`` synthetic-engine workers (``python -m workers``);
- :class:`BaselineServer`: ``python -m bench.baseline``, one process.

Both expose ``url``, ``procs`` (name -> :class:`Proc`, the server processes whose CPU is
counted) and ``rss_proc`` (the one whose memory per connection is reported: the gateway, the
baseline process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import redis.asyncio as aredis

from shared.chaos.procs import Proc, wait_redis
from shared.embedded_redis import free_port

SECRET = "bench-secret"
MODEL = "synthetic"


@dataclass(frozen=True)
class Load:
    """What one run asks of a system."""

    streams: int
    tokens: int  # per answer
    rate: float  # tokens per second per answer
    ttft_ms: float = 50.0

    def engine_env(self) -> dict[str, str]:
        """The synthetic engine's schedule, the same for the worker and the baseline."""
        return {
            "TOKENBUS_ENGINE": "synthetic",
            "TOKENBUS_MODEL": MODEL,
            "TOKENBUS_DEFAULT_MODEL": MODEL,
            "TOKENBUS_SYNTHETIC_TOKENS": str(self.tokens),
            "TOKENBUS_SYNTHETIC_TOKENS_PER_S": str(self.rate),
            "TOKENBUS_SYNTHETIC_TTFT_MS": str(self.ttft_ms),
        }


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBUS_")}
    env.pop("REDIS_URL", None)
    return env


@dataclass
class System:
    workdir: str
    load: Load
    name: str = ""
    url: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)
    rss_proc: str = ""

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, f"{self.workdir}/{self.name}-{name}.log")
        proc.start()
        self.procs[name] = proc
        return proc

    async def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def died(self) -> str:
        """The log tail of a process that exited, or ''."""
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is not None:
                return f"{proc.name} exited {proc.popen.returncode}: {proc.log_text()[-1500:]}"
        return ""

    async def _wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                problem = self.died()
                if problem:
                    raise RuntimeError(problem)
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + path) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready at {self.url}{path}")
                await asyncio.sleep(0.1)


@dataclass
class TokenbusStack(System):
    workers: int = 1

    def env(self) -> dict[str, str]:
        streams = self.load.streams
        return (
            clean_env()
            | self.load.engine_env()
            | {
                "TOKENBUS_REDIS_URL": self.redis_url,
                "TOKENBUS_SECRET": SECRET,
                "TOKENBUS_LOG_LEVEL": "WARNING",
                # Room for every stream at once: nothing is refused or queued behind a slot.
                "TOKENBUS_MAX_QUEUE_DEPTH": str(max(10_000, 2 * streams)),
                "TOKENBUS_WORKER_SLOTS": str(-(-streams // self.workers) + 1),
                "TOKENBUS_REDIS_MAX_CONNECTIONS": "64",
            }
        )

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    async def start(self) -> None:
        self.name = "tokenbus"
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (make setup installs it)")
        self.redis_port = free_port()
        argv = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", self.workdir, "--maxclients", "10000"]
        self._start("redis", argv, clean_env())
        await asyncio.to_thread(wait_redis, self.redis_url)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._start(
            "gateway", [sys.executable, "-m", "gateway"], self.env() | {"TOKENBUS_PORT": str(port)}
        )
        self.rss_proc = "gateway"
        for n in range(1, self.workers + 1):
            env = self.env() | {"TOKENBUS_WORKER_ID": f"bench-w{n}"}
            name = "worker" if self.workers == 1 else f"worker-{n}"
            self._start(name, [sys.executable, "-m", "workers"], env)
        await self._wait_ready("/readyz")
        client = aredis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 60
        try:  # every worker announced itself: jobs are not refused with no_worker
            while len(await client.keys("tokenbus:worker:*")) < self.workers:
                if self.died() or time.monotonic() > deadline:
                    raise RuntimeError(f"workers not ready: {self.died()}")
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()

    redis_port: int = 0


@dataclass
class BaselineServer(System):
    async def start(self) -> None:
        self.name = "baseline"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "bench.baseline", "--port", str(port)]
        self._start("baseline", argv, clean_env() | self.load.engine_env())
        self.rss_proc = "baseline"
        await self._wait_ready("/readyz")
