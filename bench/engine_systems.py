"""Starting, driving and stopping each system of the engine scenario, one at a time.

- ``tokenbus``: a private redis-server, one gateway and one vLLM worker, driven through the
  gateway's ``/v1/chat/completions``;
- ``vllm-server``: ``python -m vllm.entrypoints.openai.api_server`` with the same engine
  arguments as flags, driven by the same client;
- ``asyncllm``: ``AsyncLLM`` in the driving process itself (the ceiling).

Each runs every level within one start; the client (or the AsyncLLM driver) is a process of its
own, and everything a system started is stopped, its whole process tree, before the next.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.engine_client import format_levels
from bench.engine_setup import EngineSetup, server_flags, worker_env
from bench.engine_workload import Level
from shared.chaos.procs import Proc, wait_redis
from shared.embedded_redis import free_port, redis_server_argv
from shared.keys import Keys

SYSTEMS = ("tokenbus", "vllm-server", "asyncllm")
#: Longest an engine may take to start (SmolLM2 takes about 35 s on two busy cores).
START_TIMEOUT_S = 600.0
#: Longest one system's client may take for all its levels.
CLIENT_TIMEOUT_S = 7200.0


@dataclass
class Run:
    """One start of one system: every level it ran."""

    system: str
    startup_s: float
    levels: list[Level] = field(default_factory=list)


Say = Callable[[str], None]


def _descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def stop_tree(proc: Proc, grace_s: float = 30.0) -> None:
    """SIGTERM ``proc``, SIGKILL it after ``grace_s``, then whatever it started and left."""
    if proc.popen is None:
        return
    left = _descendants(proc.popen.pid)
    if proc.popen.poll() is None:
        proc.popen.terminate()
        if proc.wait(grace_s) is None:
            proc.popen.kill()
            proc.popen.wait()
    for pid in left:  # an engine core whose parent died without stopping it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _poll(check: Callable[[], bool], procs: Sequence[Proc], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        for proc in procs:
            if proc.popen is not None and proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited while starting: {proc.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _drive(
    setup: EngineSetup,
    system: str,
    base_url: str,
    pids: Sequence[int],
    levels: Sequence[tuple[int, int]],
    max_tokens: int,
    workdir: Path,
) -> list[Level]:
    out = workdir / f"{system}-levels.json"
    argv = [sys.executable, "-m", "bench.engine_client", "--base-url", base_url]
    argv += ["--model", setup.served, "--max-tokens", str(max_tokens)]
    argv += ["--levels", format_levels(levels), "--name", f"{setup.label} {system}"]
    argv += ["--system-pids", ",".join(str(p) for p in pids), "--out", str(out)]
    subprocess.run(argv, check=True, timeout=CLIENT_TIMEOUT_S)
    return _read_levels(out)


def _read_levels(path: Path) -> list[Level]:
    with path.open() as f:
        return [Level.from_json(row) for row in json.load(f)["levels"]]


def _read_startup(path: Path) -> float:
    with path.open() as f:
        return float(json.load(f)["startup_s"])


def run_tokenbus(
    setup: EngineSetup,
    levels: Sequence[tuple[int, int]],
    max_tokens: int,
    workdir: Path,
    say: Say,
) -> Run:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (make setup installs it)")
    started = time.monotonic()
    port, gateway_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = worker_env(setup.settings, url, setup.env)
    procs = [
        Proc(
            "redis",
            redis_server_argv(binary, port, str(workdir)),
            dict(os.environ),
            str(workdir / "redis.log"),
        ),
        Proc(
            "gateway",
            [sys.executable, "-m", "gateway"],
            env | {"TOKENBUS_PORT": str(gateway_port)},
            str(workdir / "gateway.log"),
        ),
        Proc("worker", [sys.executable, "-m", "workers"], env, str(workdir / "worker.log")),
    ]
    try:
        procs[0].start()
        wait_redis(url)
        for proc in procs[1:]:
            proc.start()
        client = redis.Redis.from_url(url)
        try:
            models = Keys(setup.settings.key_prefix).models
            _poll(lambda: client.zscore(models, setup.served) is not None, procs, "the worker")
        finally:
            client.close()
        base = f"http://127.0.0.1:{gateway_port}"
        _poll(lambda: _http_ok(f"{base}/readyz"), procs, "the gateway")
        startup = time.monotonic() - started
        say(f"{setup.label} tokenbus: redis, gateway and worker ready in {startup:.1f} s")
        pids = [p.pid for p in procs]
        return Run(
            "tokenbus",
            startup,
            _drive(setup, "tokenbus", f"{base}/v1", pids, levels, max_tokens, workdir),
        )
    finally:
        for proc in reversed(procs):
            stop_tree(proc)


def run_vllm_server(
    setup: EngineSetup,
    levels: Sequence[tuple[int, int]],
    max_tokens: int,
    workdir: Path,
    say: Say,
) -> Run:
    started = time.monotonic()
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *server_flags(setup.args)]
    server = Proc("vllm-server", argv, dict(os.environ) | setup.env, str(workdir / "vllm.log"))
    try:
        server.start()
        base = f"http://127.0.0.1:{port}"
        _poll(
            lambda: _http_ok(f"{base}/health") and _http_ok(f"{base}/v1/models"),
            [server],
            "vLLM's server",
        )
        startup = time.monotonic() - started
        say(f"{setup.label} vllm-server: ready in {startup:.1f} s")
        levels_run = _drive(
            setup, "vllm-server", f"{base}/v1", [server.pid], levels, max_tokens, workdir
        )
        return Run("vllm-server", startup, levels_run)
    finally:
        stop_tree(server)


def run_asyncllm(
    setup: EngineSetup,
    levels: Sequence[tuple[int, int]],
    max_tokens: int,
    workdir: Path,
    say: Say,
) -> Run:
    out = workdir / "asyncllm-levels.json"
    argv = [sys.executable, "-m", "bench.engine_asyncllm", "--engine-args", json.dumps(setup.args)]
    argv += ["--max-tokens", str(max_tokens), "--levels", format_levels(levels)]
    argv += ["--name", f"{setup.label} asyncllm", "--out", str(out)]
    with (workdir / "asyncllm.log").open("ab") as log:  # vLLM's log; progress is on stderr
        driver = subprocess.Popen(argv, env=dict(os.environ) | setup.env, stdout=log)
    try:
        code = driver.wait(CLIENT_TIMEOUT_S)
    finally:
        stop_tree(Proc("asyncllm", argv, {}, "", popen=driver))
    if code != 0:
        raise RuntimeError(f"the AsyncLLM driver exited with {code}")
    levels_run = _read_levels(out)
    for level in levels_run:  # the client is the engine's own front end here: no client apart
        level.client_cpu_s = math.nan
    return Run("asyncllm", _read_startup(out), levels_run)


RUNNERS: dict[str, Callable[[EngineSetup, Sequence[tuple[int, int]], int, Path, Say], Run]] = {
    "tokenbus": run_tokenbus,
    "vllm-server": run_vllm_server,
    "asyncllm": run_asyncllm,
}
