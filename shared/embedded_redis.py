"""A throwaway redis-server (``tokenbus up`` without a Redis, and the test fixture)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_argv(binary: str, port: int, workdir: str, logfile: str = "") -> list[str]:
    """Loopback only, nothing persisted: the data lives as long as the process."""
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", workdir]
    return argv + (["--logfile", logfile] if logfile else [])
