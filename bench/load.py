"""``python -m bench.load``: one bench client process, driving its share of the streams.

It talks to tokenbus and to the baseline alike (the same client-visible flow): open a session
(``POST /v1/sessions``), follow it (SSE ``GET /v1/sessions/{id}/events`` or the ``/v1/ws``
WebSocket), ``POST`` one job to it, and read ``stream_start``, the deltas and ``stream_end``.

The conversation with the bench process, so that every client starts at once and setup is
never measured:

1. stdin, one line: the spec (JSON, :class:`Spec`'s fields);
2. it opens every session and stream, then prints ``ready``;
3. stdin, one line: the wall-clock time to start at; from then its jobs are posted, spread
   over ``ramp_s`` by their global index;
4. once every stream ended (or the deadline passed) it prints ``finished``, then writes its
   results (:func:`_results`, JSON) to ``results_path`` and prints ``done`` (or, with no
   path, prints them as one line); the work after ``finished`` (checking the text received
   against the answer the synthetic engine must give) is outside the measured interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import resource
import sys
import time
from array import array
from dataclasses import dataclass
from typing import Any

import aiohttp

from shared.protocol import Job
from shared.synthetic import synthetic_text

#: Sessions and streams opened at once by one client during setup.
OPEN_AT_ONCE = 32
NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)


@dataclass(frozen=True)
class Spec:
    url: str
    transport: str  # "sse" or "ws"
    client: int  # this client's number; it runs the streams client, client + clients, ...
    clients: int
    streams: int  # in all, over every client
    tokens: int  # per answer
    ramp_s: float  # jobs are posted over this long, stream i at i / streams * ramp_s
    timeout_s: float  # after the start, streams not ended by then are given up
    rate: float = 0.0  # tokens/s of each answer, for when each token was due
    ttft_ms: float = 0.0
    results_path: str = ""  # where the results go (JSON); nothing: stdout


def prompt(i: int) -> str:
    return f"bench stream {i}"


def expected_text(session_id: str, i: int, tokens: int) -> str:
    """What the synthetic engine answers stream ``i``'s job (prompt and seed decide)."""
    job = Job.model_validate(
        {"session_id": session_id, "prompt": prompt(i), "sampling": {"seed": i}}
    )
    return "".join(synthetic_text(job, tokens))


class Samples:
    """Per-delta samples, compact (µs as machine integers)."""

    def __init__(self, spec: Spec) -> None:
        self.latency: array[int] = array("l")  # client receive time - the delta's "t"
        self.lateness: array[int] = array("l")  # receive time - when its last token was due
        self.ttft_s = spec.ttft_ms / 1000
        self.interval_s = 1 / spec.rate if spec.rate > 0 else 0.0


class Stream:
    """One session, its one job, and what arrived on it."""

    __slots__ = (
        "dup_tokens",
        "duplicates",
        "end_at",
        "ended",
        "epoch",
        "error",
        "events",
        "first_delta_at",
        "index",
        "last_offset",
        "parts",
        "post_ms",
        "posted_at",
        "reader",
        "session_id",
        "token",
        "tokens",
    )

    def __init__(self, index: int, session_id: str, token: str) -> None:
        self.index = index
        self.session_id = session_id
        self.token = token
        self.parts: list[str] = []
        self.tokens = 0  # as the deltas count them
        self.events = 0  # delta events
        self.epoch: str | None = None
        self.last_offset = 0
        self.duplicates = 0  # events at an offset already seen
        self.dup_tokens = 0
        self.posted_at = 0.0
        self.post_ms = -1.0
        self.first_delta_at = 0.0
        self.end_at = 0.0
        self.ended = False
        self.error = ""
        self.reader: Any = None  # the open SSE response or WebSocket

    def take(self, event: dict[str, Any], now: float, samples: Samples) -> None:
        kind = event.get("type")
        offset = event.get("offset")
        if isinstance(offset, int) and kind not in ("connected", "resync"):
            first = event.get("from_offset", offset)
            if event.get("epoch") == self.epoch and first <= self.last_offset:
                self.duplicates += 1
                if kind == "delta":
                    self.dup_tokens += int(event.get("tokens", 1))
                return
            self.epoch, self.last_offset = event.get("epoch"), offset
        if kind == "delta":
            self.parts.append(event["delta"])
            self.tokens += int(event.get("tokens", 1))
            self.events += 1
            samples.latency.append(int((now - float(event["t"])) * 1e6))
            # Due: had the job started when it was posted, and run on the engine's schedule.
            due = self.posted_at + samples.ttft_s + (self.tokens - 1) * samples.interval_s
            samples.lateness.append(int((now - due) * 1e6))
            if not self.first_delta_at:
                self.first_delta_at = now
        elif kind == "stream_end" or (kind == "error" and event.get("job_id")):
            if kind == "error":
                self.error = f"{event.get('code')}: {event.get('message')}"
            self.ended = True
            self.end_at = now


class Client:
    def __init__(self, spec: Spec, http: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.http = http
        self.streams: list[Stream] = []
        self.samples = Samples(spec)
        self.errors: list[str] = []
        self.refused = 0

    async def open(self, i: int) -> Stream:
        url = self.spec.url
        async with self.http.post(f"{url}/v1/sessions") as response:
            body = await response.json()
            if response.status != 201:
                raise RuntimeError(f"POST /v1/sessions answered {response.status}: {body}")
        s = Stream(i, body["session_id"], body["token"])
        if self.spec.transport == "sse":
            path = f"{url}/v1/sessions/{s.session_id}/events"
            resp = await self.http.get(path, params={"token": s.token}, timeout=NO_TIMEOUT)
            if resp.status != 200:
                raise RuntimeError(f"SSE answered {resp.status}: {await resp.text()}")
            s.reader = resp
        else:
            ws = await self.http.ws_connect(
                url.replace("http://", "ws://", 1) + "/v1/ws", heartbeat=None
            )
            await ws.send_json({"session_id": s.session_id, "connect": True, "token": s.token})
            hello = json.loads((await ws.receive(timeout=30)).data)
            if hello.get("type") != "connected":
                raise RuntimeError(f"WebSocket answered {hello}")
            s.reader = ws
        return s

    async def read(self, s: Stream) -> None:
        try:
            if self.spec.transport == "sse":
                await self._read_sse(s)
            else:
                await self._read_ws(s)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            s.error = s.error or f"{type(exc).__name__}: {exc}"
        finally:
            await _close(s.reader)

    async def _read_sse(self, s: Stream) -> None:
        buffer = b""
        async for chunk in s.reader.content.iter_any():
            now = time.time()
            buffer += chunk
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        s.take(json.loads(line[5:]), now, self.samples)
            if s.ended:
                return
        s.error = s.error or "SSE stream ended early"

    async def _read_ws(self, s: Stream) -> None:
        async for msg in s.reader:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            s.take(json.loads(msg.data), time.time(), self.samples)
            if s.ended:
                return
        s.error = s.error or f"WebSocket closed ({s.reader.close_code})"

    async def post(self, s: Stream, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        spec = self.spec
        body = {"prompt": prompt(s.index), "seed": s.index, "max_tokens": spec.tokens}
        headers = {"Authorization": f"Bearer {s.token}"}
        url = f"{spec.url}/v1/sessions/{s.session_id}/jobs"
        s.posted_at = time.time()
        for _ in range(20):  # 429/503: the run counts it, and tries again
            try:
                async with self.http.post(url, json=body, headers=headers) as response:
                    await response.read()
                    if response.status == 202:
                        s.post_ms = (time.time() - s.posted_at) * 1e3
                        return
                    self.refused += 1
                    problem = f"job POST answered {response.status}"
            except (aiohttp.ClientError, OSError) as exc:
                problem = f"job POST failed: {exc}"
            await asyncio.sleep(0.2)
        s.error = problem


async def _close(reader: Any) -> None:
    if reader is None:
        return
    with contextlib.suppress(Exception):
        if isinstance(reader, aiohttp.ClientResponse):
            reader.close()
        else:
            await reader.close()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _line() -> str:
    return await asyncio.to_thread(sys.stdin.readline)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def run(spec: Spec) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        client = Client(spec, http)
        gate = asyncio.Semaphore(OPEN_AT_ONCE)

        async def opened(i: int) -> Stream:
            async with gate:
                return await client.open(i)

        indices = range(spec.client, spec.streams, spec.clients)
        client.streams = list(await asyncio.gather(*(opened(i) for i in indices)))
        readers = [asyncio.create_task(client.read(s)) for s in client.streams]
        _say("ready")
        start_at = float(await _line())
        # No collector pauses of the client's own inside the measured interval: they would
        # count as latency of whichever system is measured.
        gc.collect()
        gc.freeze()
        gc.disable()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0 = _cpu_s()
        posts = [
            asyncio.create_task(client.post(s, start_at + s.index / spec.streams * spec.ramp_s))
            for s in client.streams
        ]
        _, pending = await asyncio.wait(readers, timeout=spec.timeout_s)
        cpu = _cpu_s() - cpu0
        finished_at = time.time()
        _say("finished")
        gc.enable()
        for task in [*pending, *posts]:
            task.cancel()
        await asyncio.gather(*pending, *posts, return_exceptions=True)
        for s in client.streams:
            if not s.ended and not s.error:
                s.error = "not ended by the deadline"
        return _results(client, start_at, finished_at, cpu)


def _results(client: Client, start_at: float, finished_at: float, cpu: float) -> dict[str, Any]:
    spec = client.spec
    lost = duplicated = completed = unfinished = 0
    for s in client.streams:
        want = expected_text(s.session_id, s.index, spec.tokens)
        got = "".join(s.parts)
        duplicated += s.dup_tokens
        if got == want and s.ended and not s.error:
            completed += 1
            continue
        words_want, words_got = want.split(" "), got.split(" ") if got else []
        same = 0
        while same < min(len(words_want), len(words_got)) and words_want[same] == words_got[same]:
            same += 1
        if s.ended:  # the answer is over: what it lacks is lost
            lost += len(words_want) - same
        else:  # cut off or still running at the deadline: lost only what came wrong
            unfinished += 1
            lost += max(0, min(len(words_got), len(words_want)) - same)
        if got.startswith(want):
            duplicated += len(words_got) - len(words_want)
        if s.error and len(client.errors) < 5:
            client.errors.append(s.error)
    ends = [s.end_at for s in client.streams if s.end_at]
    return {
        "client": spec.client,
        "streams": len(client.streams),
        "completed": completed,
        "unfinished": unfinished,
        "tokens": sum(s.tokens for s in client.streams),
        "events": sum(s.events for s in client.streams),
        "lost": lost,
        "duplicated": duplicated,
        "duplicate_events": sum(s.duplicates for s in client.streams),
        "refused": client.refused,
        "latency_us": client.samples.latency.tolist(),
        "lateness_us": client.samples.lateness.tolist(),
        "ttft_ms": [
            round((s.first_delta_at - s.posted_at) * 1e3, 2)
            for s in client.streams
            if s.first_delta_at and s.posted_at
        ],
        "post_ms": [round(s.post_ms, 2) for s in client.streams if s.post_ms >= 0],
        "start_at": start_at,
        "last_end": max(ends) if ends else finished_at,
        "cpu_s": round(cpu, 3),
        "errors": client.errors,
    }


def raise_nofile() -> None:
    """Open files up to the hard limit: thousands of sockets per process."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    raise_nofile()
    spec = Spec(**json.loads(sys.stdin.readline()))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        results = runner.run(run(spec))
    text = json.dumps(results, separators=(",", ":"))
    if spec.results_path:
        with open(spec.results_path, "w") as f:
            f.write(text)
        _say("done")
    else:
        _say(text)


if __name__ == "__main__":
    main()
