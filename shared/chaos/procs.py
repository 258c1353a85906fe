"""The processes a chaos scenario runs: one Redis, gateways and synthetic-engine workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
import redis
import redis.asyncio as aredis

from shared.chaos.vip import Vip
from shared.embedded_redis import free_port

#: The session-token key every process of a run shares.
SECRET = "chaos-secret"
MODEL = "synthetic"


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: str
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its life
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log)
        log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if it is still running after ``timeout`` seconds."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            if self.wait(10) is None:
                self.popen.kill()
                self.popen.wait()

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@dataclass
class Cluster:
    """Redis + gateways + workers on 127.0.0.1, all under one work directory."""

    workdir: str
    redis_port: int
    aof: bool = False
    worker_env: dict[str, str] = field(default_factory=dict)
    redis: Proc | None = None
    gateways: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    replica: Proc | None = None
    replica_port: int = 0
    vip: Vip | None = None  # set: clients reach Redis through it, and it moves on failover

    @property
    def redis_url(self) -> str:
        port = self.vip.port if self.vip is not None else self.redis_port
        return f"redis://127.0.0.1:{port}/0"

    async def start_replica(self) -> None:
        """An asynchronous replica of the master, and a VIP in front of the master."""
        binary = shutil.which("redis-server")
        assert binary is not None
        self.replica_port = free_port()
        argv = [binary, "--port", str(self.replica_port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", self.workdir, "--dbfilename", "replica.rdb"]
        argv += ["--replicaof", "127.0.0.1", str(self.redis_port)]
        self.replica = Proc("replica", argv, dict(os.environ), f"{self.workdir}/replica.log")
        self.replica.start()
        wait_redis(f"redis://127.0.0.1:{self.replica_port}/0")
        client = aredis.Redis(port=self.replica_port)
        try:  # in sync before the load starts: what it lacks at failover is then only lag
            async with asyncio.timeout(30):
                while (await client.info("replication")).get("master_link_status") != "up":  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        finally:
            await client.aclose()
        self.vip = Vip(self.redis_port)
        await self.vip.start()

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBUS_")}
        env.pop("REDIS_URL", None)
        env.update(
            TOKENBUS_REDIS_URL=self.redis_url,
            TOKENBUS_SECRET=SECRET,
            TOKENBUS_ENGINE="synthetic",
            TOKENBUS_MODEL=MODEL,
            TOKENBUS_DEFAULT_MODEL=MODEL,
            TOKENBUS_LOG_LEVEL="INFO",
        )
        return env

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (make setup installs it)")
        argv = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--dir", self.workdir, "--repl-diskless-sync-delay", "0"]
        # fsync on every write: a restart loses nothing acknowledged (the README's table
        # says what "everysec" can lose).
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else []
        argv += ["--appendonly", "no"] if not self.aof else []
        self.redis = Proc("redis", argv, dict(os.environ), f"{self.workdir}/redis.log")
        self.redis.start()
        wait_redis(self.redis_url)

    def add_gateway(self) -> Proc:
        port = free_port()
        env = self.base_env() | {"TOKENBUS_PORT": str(port)}
        proc = Proc(
            f"gateway-{len(self.gateways) + 1}",
            [sys.executable, "-m", "gateway"],
            env,
            f"{self.workdir}/gateway-{len(self.gateways) + 1}.log",
        )
        proc.start()
        self.gateways.append(proc)
        self.ports.append(port)
        return proc

    def add_worker(self, **env: str) -> Proc:
        n = len(self.workers) + 1
        full = self.base_env() | self.worker_env | env | {"TOKENBUS_WORKER_ID": f"chaos-w{n}"}
        proc = Proc(
            f"worker-{n}", [sys.executable, "-m", "workers"], full, f"{self.workdir}/worker-{n}.log"
        )
        proc.start()
        self.workers.append(proc)
        return proc

    async def ready(self, timeout: float = 60.0) -> None:
        """Every gateway answers /readyz and every worker has announced itself."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            for url, proc in zip(self.urls, self.gateways, strict=True):
                while True:
                    if proc.popen is not None and proc.popen.poll() is not None:
                        raise RuntimeError(f"{proc.name} exited: {proc.log_text()[-2000:]}")
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{url}/readyz") as response:
                            if response.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{proc.name} not ready")
                    await asyncio.sleep(0.1)
        # Async: Redis may be reached through the VIP, which runs on this very loop.
        client = aredis.Redis.from_url(self.redis_url)
        try:
            while len(await client.keys("tokenbus:worker:*")) < len(self.workers):
                if time.monotonic() > deadline:
                    raise TimeoutError("workers not ready")
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()

    def stop(self) -> None:
        for proc in [*self.gateways, *self.workers]:
            proc.stop()
        for server in (self.redis, self.replica):
            if server is not None:
                server.stop()


def wait_redis(url: str, timeout: float = 20.0) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


@contextlib.contextmanager
def cluster(*, aof: bool = False, worker_env: dict[str, str] | None = None) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="tokenbus-chaos-") as workdir:
        c = Cluster(workdir, free_port(), aof=aof, worker_env=dict(worker_env or {}))
        try:
            c.start_redis()
            yield c
        finally:
            c.stop()
