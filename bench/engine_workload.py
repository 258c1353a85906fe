"""What every system of the engine scenario is asked, and how one level's answers are measured.

The three systems (tokenbus, vLLM's OpenAI server, AsyncLLM in-process) get the same chat
prompts, greedy (temperature 0) and ``max_tokens`` long, so the same engine gives them the same
answers, token for token. A level is a closed loop: ``concurrency`` users, each sending its
next request when its last answer ended, until ``requests`` have been sent.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.measure import machine_busy_seconds

TOPICS = (
    "a lighthouse keeper who finds a map",
    "two robots learning to cook",
    "a city built on the back of a whale",
    "the last library on the moon",
    "a dragon who is afraid of heights",
    "a detective who can hear colours",
    "a train that never stops",
    "a garden that grows overnight",
    "a sailor lost in a sea of fog",
    "a clockmaker's apprentice",
    "a village where it always snows",
    "a musician who plays for the stars",
    "an astronaut's first day on Mars",
    "a cat who becomes mayor",
    "a river that flows uphill",
    "the inventor of the first umbrella",
)


def prompt(level: int, index: int) -> str:
    """The user message of request ``index`` at ``level`` (every request its own text)."""
    topic = TOPICS[index % len(TOPICS)]
    return f"Write a long, detailed story about {topic}. This is story {level}-{index}."


def messages(level: int, index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt(level, index)}]


@dataclass
class Record:
    """One answer as its client saw it; times in seconds from sending the request."""

    ok: bool = False
    error: str = ""
    ttft: float = math.nan  # first answer text
    e2e: float = math.nan  # last byte of the answer (usage chunk / finished output)
    tokens: int = 0  # answer tokens (the usage the system reported)
    prompt_tokens: int = 0  # as the system counted them: the same prompt gives the same ids
    chunks: int = 0  # pieces the answer text came in
    max_gap: float = 0.0  # longest wait between two pieces of text

    @property
    def itl(self) -> float:
        """Mean time between tokens after the first: a chunk may carry several."""
        if self.tokens < 2 or math.isnan(self.ttft):
            return math.nan
        return (self.e2e - self.ttft) / (self.tokens - 1)


class Clock:
    """Times one answer: call ``text()`` on each piece of answer text, ``done()`` at the end."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.record = Record()
        self._last = 0.0

    def text(self, piece: str) -> None:
        if not piece:
            return
        now = time.perf_counter() - self.started
        r = self.record
        if r.chunks == 0:
            r.ttft = now
        else:
            r.max_gap = max(r.max_gap, now - self._last)
        r.chunks += 1
        self._last = now

    def done(self, tokens: int, error: str = "", prompt_tokens: int = 0) -> Record:
        self.record.e2e = time.perf_counter() - self.started
        self.record.tokens = tokens
        self.record.prompt_tokens = prompt_tokens
        self.record.error = error
        self.record.ok = not error
        return self.record


@dataclass
class Level:
    """One concurrency level of one system's run."""

    concurrency: int
    requests: int
    wall_s: float
    records: list[Record]
    #: CPU seconds over the level: this process (the client), and the system measured.
    client_cpu_s: float = math.nan
    system_cpu_s: float = math.nan
    #: CPU seconds every other process on the machine used meanwhile: the noise.
    other_cpu_s: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Level:
        records = [Record(**r) for r in data.pop("records")]
        return cls(records=records, **data)


Send = Callable[[int, int], Awaitable[Record]]


async def closed_loop(send: Send, level: int, concurrency: int, requests: int) -> Level:
    """``requests`` calls of ``send(level, index)``, ``concurrency`` at a time."""
    indices = iter(range(requests))
    records: list[Record] = []

    async def user() -> None:
        for index in indices:  # one iterator shared by every user: each index goes once
            records.append(await send(level, index))

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(min(concurrency, requests))))
    return Level(concurrency, requests, time.perf_counter() - started, records)


async def run_levels(
    send: Send,
    levels: Sequence[tuple[int, int]],
    *,
    name: str,
    system_pids: Callable[[], Sequence[int]],
    say: Callable[[str], None],
) -> list[Level]:
    """Each (concurrency, requests) level in turn, with CPU seconds of client and system."""
    out = []
    for concurrency, requests in levels:
        pids = system_pids()
        client0, system0, machine0 = own_cpu_s(), tree_cpu_s(pids), machine_busy_seconds()
        level = await closed_loop(send, concurrency, concurrency, requests)
        level.client_cpu_s = own_cpu_s() - client0
        level.system_cpu_s = tree_cpu_s(pids) - system0
        ours = level.system_cpu_s + (0.0 if os.getpid() in pids else level.client_cpu_s)
        level.other_cpu_s = max(0.0, machine_busy_seconds() - machine0 - ours)
        tokens = sum(r.tokens for r in level.records)
        errors = sum(not r.ok for r in level.records)
        say(
            f"{name}: concurrency {concurrency}: {requests} answers, {tokens} tokens in "
            f"{level.wall_s:.1f} s ({tokens / level.wall_s:.1f} tokens/s)"
            + (f", {errors} FAILED: {_first_error(level.records)}" if errors else "")
        )
        out.append(level)
    return out


def _first_error(records: Sequence[Record]) -> str:
    return next((r.error for r in records if r.error), "")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def tree_cpu_s(roots: Sequence[int]) -> float:
    """CPU seconds (user + system) of ``roots`` and every live descendant; nan off Linux."""
    if not roots or not os.path.isdir("/proc/self"):
        return math.nan
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        rest = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parents[pid] = int(rest[1])
        times[pid] = (int(rest[11]) + int(rest[12])) / tick
    wanted = set(roots)
    changed = True
    while changed:
        grown = {p for p, parent in parents.items() if parent in wanted} - wanted
        changed = bool(grown)
        wanted |= grown
    return sum(times.get(p, 0.0) for p in wanted)
