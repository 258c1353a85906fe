"""Reading a session as a client does, through whichever gateway answers, resuming by offset.

Deliberately not shared.client: the raw SSE and WebSocket interfaces are what is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

Transport = Literal["sse", "ws"]
TERMINAL = frozenset({"stream_end", "error"})


@dataclass
class Stream:
    """One session with one job, and everything a client received on it."""

    session_id: str
    token: str
    job_id: str = ""
    expected: list[str] = field(default_factory=list)  # the answer's tokens
    epoch: str | None = None
    offset: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    delta_times: list[float] = field(default_factory=list)  # monotonic, per delta
    tokens: int = 0  # received, as the deltas count them
    seen: set[tuple[str, int]] = field(default_factory=set)
    duplicate_events: int = 0
    reconnects: int = 0
    resyncs: int = 0
    ended: bool = False

    def take(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "resync":
            self.resyncs += 1
        epoch, offset = event.get("epoch"), event.get("offset")
        # Session events only: "connected" and "resync" carry a position but are no event.
        if (
            kind not in ("connected", "resync")
            and isinstance(epoch, str)
            and isinstance(offset, int)
        ):
            if (epoch, offset) in self.seen and kind != "resync":
                self.duplicate_events += 1
                return
            self.seen.add((epoch, offset))
        if kind != "connected" and isinstance(epoch, str) and isinstance(offset, int):
            self.epoch, self.offset = epoch, offset
        if kind not in ("delta", "stream_start", "stream_end", "error"):
            return
        if self.job_id and event.get("job_id") not in (None, self.job_id):
            return
        self.events.append(event)
        if kind == "delta":
            self.delta_times.append(time.monotonic())
            self.tokens += int(event.get("tokens", 0))
        if kind in TERMINAL and event.get("job_id"):
            self.ended = True


def _ws_url(base: str) -> str:
    return base.replace("http://", "ws://", 1) + "/v1/ws"


async def _follow_sse(http: aiohttp.ClientSession, base: str, s: Stream) -> None:
    url = f"{base}/v1/sessions/{s.session_id}/events"
    headers = {"Last-Event-ID": f"{s.epoch}:{s.offset}"} if s.epoch else {}
    params = {"token": s.token}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with http.get(url, params=params, headers=headers, timeout=timeout) as response:
        if response.status != 200:
            raise ConnectionError(f"SSE answered {response.status}")
        data: list[str] = []
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:
                s.take(json.loads("\n".join(data)))
                data = []
                if s.ended:
                    return
    raise ConnectionError("SSE stream ended")


async def _follow_ws(http: aiohttp.ClientSession, base: str, s: Stream) -> None:
    async with http.ws_connect(_ws_url(base), heartbeat=None) as ws:
        hello: dict[str, Any] = {"session_id": s.session_id, "connect": True, "token": s.token}
        hello["offset"] = s.offset
        if s.epoch:
            hello["epoch"] = s.epoch
        await ws.send_json(hello)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            s.take(json.loads(msg.data))
            if s.ended:
                return
    raise ConnectionError(f"WebSocket closed ({ws.close_code})")


async def follow(
    http: aiohttp.ClientSession,
    bases: list[str],
    s: Stream,
    transport: Transport,
    *,
    deadline: float,
    first: int = 0,
) -> None:
    """Follow ``s`` until its job ends or ``deadline`` (monotonic), moving between gateways."""
    i = first
    while not s.ended and time.monotonic() < deadline:
        base = bases[i % len(bases)]
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                if transport == "sse":
                    await _follow_sse(http, base, s)
                else:
                    await _follow_ws(http, base, s)
        except TimeoutError:
            return
        except (aiohttp.ClientError, ConnectionError, OSError, json.JSONDecodeError):
            s.reconnects += 1
            i += 1
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
