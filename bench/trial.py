"""One measured run: a fresh system, separate client processes started on a barrier, figures.

The measured interval runs from the moment the clients start posting jobs (every session and
stream is open by then) until the last client has seen its last stream end. Server CPU is
read from /proc over exactly that interval; the clients count their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench import profile
from bench.load import Spec, raise_nofile
from bench.measure import cpu_seconds, machine_busy_seconds, percentile, rss_bytes
from bench.stack import BaselineServer, Load, System, TokenbusStack


@dataclass(frozen=True)
class Trial:
    system: str  # "tokenbus" or "baseline"
    transport: str  # "sse" or "ws"
    load: Load
    clients: int = 4
    ramp_s: float = 1.0  # jobs posted over this long
    workers: int = 1
    slack_s: float = 30.0  # past the answers' own length, before streams are given up
    profile_dir: str = ""  # set: py-spy records the gateway and workers during the run

    @property
    def timeout_s(self) -> float:
        load = self.load
        answer_s = load.ttft_ms / 1000 + (load.tokens / load.rate if load.rate > 0 else 0)
        return self.ramp_s + answer_s + self.slack_s

    def label(self) -> str:
        load = self.load
        return (
            f"{self.system} {self.transport}: {load.streams} streams x {load.tokens} tokens "
            f"at {load.rate:g}/s"
        )


class _ClientProc:
    def __init__(self, proc: asyncio.subprocess.Process, log_path: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.results_path = log_path.replace(".log", ".json")

    async def expect(self, word: str, timeout: float) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if line.strip() != word.encode():
            raise RuntimeError(f"bench client said {line[:200]!r}, not {word!r}: {self.log_tail()}")

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def results(self, timeout: float) -> dict[str, Any]:
        await self.expect("done", timeout)
        await asyncio.wait_for(self.proc.wait(), timeout)
        value: dict[str, Any] = json.loads(await asyncio.to_thread(_read, self.results_path))
        return value

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-1500:]

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


async def _spawn_clients(trial: Trial, workdir: str) -> list[_ClientProc]:
    """Client processes, importing while the system starts; each waits for its spec."""
    clients = []
    for n in range(trial.clients):
        log_path = f"{workdir}/client-{n}.log"
        with await asyncio.to_thread(open, log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.load",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        clients.append(_ClientProc(proc, log_path))
    return clients


async def _send_specs(trial: Trial, url: str, clients: list[_ClientProc]) -> None:
    for n, client in enumerate(clients):
        spec = Spec(
            url=url,
            transport=trial.transport,
            client=n,
            clients=trial.clients,
            streams=trial.load.streams,
            tokens=trial.load.tokens,
            ramp_s=trial.ramp_s,
            timeout_s=trial.timeout_s,
            rate=trial.load.rate,
            ttft_ms=trial.load.ttft_ms,
            results_path=client.results_path,
        )
        await client.send(json.dumps(asdict(spec)))


async def run_trial(trial: Trial) -> dict[str, Any]:
    """The trial's figures (see :func:`_figures`); ``errors`` lists what went wrong."""
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="tokenbus-bench-") as workdir:
        system: System
        if trial.system == "tokenbus":
            system = TokenbusStack(workdir, trial.load, workers=trial.workers)
        else:
            system = BaselineServer(workdir, trial.load)
        clients: list[_ClientProc] = []
        try:
            clients.extend(await _spawn_clients(trial, workdir))
            await system.start()
            return await _measure(trial, system, clients)
        finally:
            for client in clients:
                client.kill()
            await asyncio.to_thread(system.stop)


async def _measure(trial: Trial, system: System, clients: list[_ClientProc]) -> dict[str, Any]:
    rss_pid = system.procs[system.rss_proc].pid
    rss_before = rss_bytes(rss_pid)
    await _send_specs(trial, system.url, clients)
    setup_s = 60 + trial.load.streams / 20
    await asyncio.gather(*(c.expect("ready", setup_s) for c in clients))
    pids = {name: proc.pid for name, proc in system.procs.items()}
    rss_peak = rss_bytes(rss_pid)
    recorders = profile.start(trial, system) if trial.profile_dir else []
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy_before = machine_busy_seconds()
    start_at = time.time() + 0.3
    await asyncio.gather(*(c.send(repr(start_at)) for c in clients))
    finished = asyncio.gather(*(c.expect("finished", trial.timeout_s + 30) for c in clients))
    while not finished.done():
        rss_peak = max(rss_peak, rss_bytes(rss_pid))
        await asyncio.wait([finished], timeout=0.25)
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    busy = machine_busy_seconds() - busy_before
    died = system.died()
    profile.stop(recorders)
    finished.result()
    results = await asyncio.gather(*(c.results(120) for c in clients))
    figures = _figures(trial, results, cpu, (rss_peak - rss_before) / trial.load.streams)
    # The machine's CPU use that was neither the system's nor the clients': noise.
    figures["other_cpu_s"] = max(0.0, busy - figures["cpu_server_s"] - figures["client_cpu_s"])
    if died:
        figures["errors"].append(died)
    return figures


def _figures(
    trial: Trial, results: list[dict[str, Any]], cpu: dict[str, float], rss_per_conn: float
) -> dict[str, Any]:
    def total(key: str) -> int:
        return sum(int(r[key]) for r in results)

    def merged(key: str) -> list[float]:
        return sorted(v for r in results for v in r[key])

    start_at = results[0]["start_at"]
    duration = max(r["last_end"] for r in results) - start_at
    tokens = total("tokens")
    latency = [v / 1000 for v in merged("latency_us")]  # ms
    lateness = [v / 1000 for v in merged("lateness_us")]
    ttft, post = merged("ttft_ms"), merged("post_ms")
    server_cpu = sum(v for v in cpu.values() if not math.isnan(v))
    figures: dict[str, Any] = {
        "system": trial.system,
        "transport": trial.transport,
        "streams": trial.load.streams,
        "tokens_per_stream": trial.load.tokens,
        "rate": trial.load.rate,
        "completed": total("completed"),
        "unfinished": total("unfinished"),
        "tokens": tokens,
        "events": total("events"),
        "lost": total("lost"),
        "duplicated": total("duplicated"),
        "refused": total("refused"),
        "duration_s": duration,
        "tokens_per_s": tokens / duration if duration > 0 else math.nan,
        "events_per_s": total("events") / duration if duration > 0 else math.nan,
        "latency_p50_ms": percentile(latency, 50),
        "latency_p99_ms": percentile(latency, 99),
        "latency_max_ms": latency[-1] if latency else math.nan,
        "lateness_p50_ms": percentile(lateness, 50),
        "lateness_p99_ms": percentile(lateness, 99),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "post_p50_ms": percentile(post, 50),
        "post_p99_ms": percentile(post, 99),
        **{f"cpu_{name}_s": value for name, value in cpu.items()},
        "cpu_server_s": server_cpu,
        "cpu_us_per_token": server_cpu / tokens * 1e6 if tokens else math.nan,
        "client_cpu_s": sum(float(r["cpu_s"]) for r in results),
        "rss_per_conn_kib": rss_per_conn / 1024,
        "errors": [e for r in results for e in r["errors"]][:5],
    }
    return figures


def complete(figures: dict[str, Any]) -> bool:
    """Every stream got its whole answer, once."""
    return bool(
        figures["completed"] == figures["streams"]
        and figures["lost"] == 0
        and figures["duplicated"] == 0
        and not figures["errors"]
    )
