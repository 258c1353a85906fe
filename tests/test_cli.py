"""The ``tokenbus`` command: schema, settings, enqueue, and ``up`` running the whole stack."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from shared.cli import schema_text, settings_markdown
from shared.codec import decode_job
from shared.embedded_redis import free_port
from shared.keys import Keys
from shared.protocol import job_json_schema
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def tokenbus() -> list[str]:
    """The installed console script when there is one (`make setup`), else the module."""
    script = Path(sys.executable).parent / "tokenbus"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shared.cli"]


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBUS_")}
    env.pop("REDIS_URL", None)
    env.update(overrides)
    return env


def test_schema_writes_the_job_schema(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "job.json"
    subprocess.run(
        [*tokenbus(), "schema", "--out", str(out)], cwd=ROOT, check=True, timeout=60, env=_env()
    )
    text = out.read_text()
    assert text == schema_text()
    assert text.endswith("}\n")
    assert json.loads(text) == job_json_schema()


def test_settings_markdown_lists_every_setting_and_readme_has_it() -> None:
    done = subprocess.run(
        [*tokenbus(), "settings", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=_env(),
    )
    assert done.stdout == settings_markdown()
    for name in Settings.model_fields:
        assert f"`TOKENBUS_{name.upper()}`" in done.stdout
    readme = (ROOT / "README.md").read_text()
    assert done.stdout in readme, "README settings table is stale: `tokenbus settings --markdown`"


async def test_enqueue_leaves_a_decodable_job(settings: Settings, redis: Redis, keys: Keys) -> None:
    env = _env(TOKENBUS_REDIS_URL=settings.redis_url, TOKENBUS_KEY_PREFIX=settings.key_prefix)
    proc = await asyncio.create_subprocess_exec(
        *tokenbus(),
        "enqueue",
        "--session",
        "demo-1",
        "--prompt",
        "Hello there",
        "--model",
        "synthetic",
        "--max-tokens",
        "7",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    job_id = out.decode().strip()
    assert job_id

    entries = await redis.xrange(keys.jobs_stream("synthetic"))
    assert entries is not None and len(entries) == 1
    fields = entries[0][1]
    assert fields is not None
    job = decode_job(fields)
    assert (job.id, job.session_id, job.prompt, job.max_tokens) == (
        job_id,
        "demo-1",
        "Hello there",
        7,
    )
    assert await redis.hget(keys.job(job_id), "state") == b"queued"


async def test_enqueue_refuses_a_bad_session_id(settings: Settings, redis: Redis) -> None:
    env = _env(TOKENBUS_REDIS_URL=settings.redis_url, TOKENBUS_KEY_PREFIX=settings.key_prefix)
    proc = await asyncio.create_subprocess_exec(
        *tokenbus(),
        "enqueue",
        "--session",
        "no spaces allowed",
        "--prompt",
        "x",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "session_id" in err.decode()


# ---------------------------------------------------------------------------------------------
# tokenbus up


class _Up:
    """``tokenbus up`` as a child process; collects its output lines as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*tokenbus(), "up", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"tokenbus up exited ({self.proc.returncode}):\n{self.output}")
            time.sleep(0.1)
        pytest.fail(f"no line matching {pattern!r} in {timeout}s:\n{self.output}")

    def pids(self) -> list[int]:
        return [int(m) for line in self.lines for m in re.findall(r"\bpid (\d+)\b", line)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def up_env() -> Iterator[dict[str, str]]:
    # A Redis URL nobody answers on: `up` must start its own redis-server.
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    yield _env(
        TOKENBUS_REDIS_URL=unreachable,
        TOKENBUS_KEY_PREFIX="tbt-up",
        TOKENBUS_SECRET="test-secret",
        TOKENBUS_BLOCK_MS="500",
        TOKENBUS_HEARTBEAT_S="0.5",
        TOKENBUS_ENGINE="synthetic",
        TOKENBUS_MODEL="synthetic",
        TOKENBUS_DEFAULT_MODEL="synthetic",
    )


def test_up_runs_the_stack_on_an_embedded_redis_and_stops_it_on_sigint(
    up_env: dict[str, str],
) -> None:
    import redis as sync_redis

    port = free_port()
    up = _Up(
        ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--grace", "15"], up_env
    )
    try:
        redis_line = up.wait_for(r"redis\s+(redis://\S+) \(embedded redis-server, pid (\d+)", 30)
        redis_url, redis_pid = redis_line.group(1), int(redis_line.group(2))
        assert redis_url != up_env["TOKENBUS_REDIS_URL"]
        up.wait_for(r"tokenbus: ready", 90)

        base = f"http://127.0.0.1:{port}"
        assert f"{base}/healthz" in up.output
        assert f"ws://127.0.0.1:{port}/v1/ws" in up.output
        assert "tbt-up:jobs:synthetic" in up.output
        assert _get(f"{base}/healthz") == 200
        assert _get(f"{base}/readyz") == 200
        client = sync_redis.Redis.from_url(redis_url)
        assert client.ping()
        client.close()

        pids = up.pids()
        assert redis_pid in pids and len(pids) >= 3, up.output  # redis, gateway, worker

        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0, up.output
    finally:
        up.stop()
    for pid in up.pids():
        assert _gone(pid), f"pid {pid} outlived tokenbus up:\n{up.output}"
    assert "stopped redis-server" in up.output


def test_up_exits_non_zero_when_a_child_dies(up_env: dict[str, str]) -> None:
    port = free_port()
    up = _Up(["--port", str(port), "--workers", "1", "--embedded-redis"], up_env)
    try:
        worker_pid = int(up.wait_for(r"started worker 1 \(pid (\d+)\)", 30).group(1))
        up.wait_for(r"tokenbus: ready", 90)
        os.kill(worker_pid, signal.SIGKILL)
        assert up.proc.wait(60) == 1, up.output
    finally:
        up.stop()
    assert f"worker 1 (pid {worker_pid}) exited with code -9" in up.output
    for pid in up.pids():
        assert _gone(pid), f"pid {pid} outlived tokenbus up:\n{up.output}"


async def test_token_reads_a_session_another_service_named(settings: Settings) -> None:
    from shared.redis_client import connect
    from shared.tokens import shared_secret, verify

    env = _env(TOKENBUS_REDIS_URL=settings.redis_url, TOKENBUS_KEY_PREFIX=settings.key_prefix)
    env.pop("TOKENBUS_SECRET", None)
    proc = await asyncio.create_subprocess_exec(
        *tokenbus(), "token", "demo-1", stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    token = out.decode().strip()
    client = connect(settings.model_copy(update={"secret": ""}))
    secret = await shared_secret(client, Keys(settings.key_prefix), "")
    await client.aclose()
    assert verify(secret, "demo-1", token)
    assert not verify(secret, "demo-2", token)

    bad = await asyncio.create_subprocess_exec(
        *tokenbus(), "token", "{bad}", stderr=asyncio.subprocess.PIPE, env=env
    )
    _, err = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode != 0 and b"invalid session id" in err
