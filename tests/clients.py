"""Real clients for tests: an SSE reader and WebSocket helpers over aiohttp."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass
class SseEvent:
    id: str | None
    data: dict[str, Any]


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """Parse a text/event-stream body into events (comments and retry lines skipped)."""
    event_id: str | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(event_id, json.loads("\n".join(data)))
            event_id, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                event_id = value
            elif field == "data":
                data.append(value)


async def read_sse_until(
    http: aiohttp.ClientSession,
    url: str,
    *,
    until_type: str = "stream_end",
    count: int = 1,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[SseEvent]:
    """Collect SSE events until ``count`` events of ``until_type`` arrived."""
    got: list[SseEvent] = []
    seen = 0
    async with asyncio.timeout(timeout), http.get(url, headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        async for event in sse_events(response):
            got.append(event)
            if event.data.get("type") == until_type:
                seen += 1
                if seen >= count:
                    break
    return got


async def ws_receive_until(
    ws: aiohttp.ClientWebSocketResponse,
    *,
    until_type: str = "stream_end",
    count: int = 1,
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    seen = 0
    async with asyncio.timeout(timeout):
        while seen < count:
            message = await ws.receive_json()
            got.append(message)
            if message.get("type") == until_type:
                seen += 1
    return got


def answer_text(events: list[dict[str, Any]], job_id: str | None = None) -> str:
    return "".join(
        e["delta"]
        for e in events
        if e.get("type") == "delta" and (job_id is None or e.get("job_id") == job_id)
    )


def assert_contiguous(events: list[dict[str, Any]], start: int = 1) -> None:
    """Session events (those with an offset) cover start, start+1, ... once, in one epoch."""
    positioned = [e for e in events if "offset" in e and e.get("type") != "resync"]
    expected = start
    for event in positioned:
        # A merged delta (slow client) covers from_offset..offset.
        assert event.get("from_offset", event["offset"]) == expected, (expected, event)
        expected = event["offset"] + 1
    assert len({e["epoch"] for e in positioned}) <= 1


async def follow(ws: aiohttp.ClientWebSocketResponse, session_id: str, **fields: Any) -> None:
    """Send the connect message (token from the URL unless given) and expect ``connected``."""
    await ws.send_json({"session_id": session_id, "connect": True, **fields})
    reply = await ws.receive_json()
    assert reply["type"] == "connected", reply
