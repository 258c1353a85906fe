"""A redis-server a test owns: killed with SIGKILL, paused, and restarted on the same port.

It keeps an append-only file with ``appendfsync always`` in its own folder, so a restart loads
everything acknowledged before the kill, as a production Redis with AOF would (the loss a
looser fsync policy allows is not what these tests are about). Never the shared test server.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from shared.embedded_redis import free_port


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: `apt-get install redis-server`")
        self._binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        return [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
            *extra,
        ]

    def start(self, *extra: str, wait: bool = True) -> None:
        """Start (again) on the same port and folder; ``extra`` are more server options."""
        assert self._proc is None or self._proc.poll() is not None, "already running"
        self._proc = subprocess.Popen(self.argv(*extra))
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until PING answers (not while the AOF loads: that answers LOADING)."""
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=5, retry=None)
        try:
            while True:
                assert self._proc is not None and self._proc.poll() is None, "redis-server died"
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(timeout=10)

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)


@contextlib.contextmanager
def restartable_redis(workdir: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
