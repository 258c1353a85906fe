"""A real Redis for tests: REDIS_URL, else testcontainers (when Docker answers), else a binary."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis

from shared.embedded_redis import free_port, redis_server_argv


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _wait_ready(url: str, timeout: float = 20.0) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def redis_binary(port: int | None = None) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server not found: `apt-get install redis-server` (make test does)"
        )
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="tokenbus-redis-") as workdir:
        proc = subprocess.Popen(
            redis_server_argv(binary, port, workdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_ready(url)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextlib.contextmanager
def test_redis() -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        _wait_ready(url)
        yield url
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    with redis_binary() as url:
        yield url
