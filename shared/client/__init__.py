"""An async Python client for tokenbus: sessions, jobs, and event streams that survive drops.

    async with Client("http://127.0.0.1:8000") as client:
        chat = await client.session()
        async for text in chat.ask("What is the capital of France?"):
            print(text, end="", flush=True)

Events arrive over a WebSocket (``transport="ws"``, the default) or Server-Sent Events
(``"sse"``). Each stream remembers the last ``(epoch, offset)`` it delivered; when its connection
drops (a gateway restart, a slow-consumer close, a network error) it reconnects with backoff and
resumes from there, so the caller sees every event once, in order. A gateway that drains
(SIGTERM) sends its clients elsewhere: they reconnect at once, to the next of the client's base
URLs when it has several. A ``resync`` event (history lost) is yielded by ``events()``; ``ask()``
raises ``ResyncError`` instead, since its text would have a gap.

This package needs aiohttp and the standard library only: no gateway or worker code. Its
modules, by concept: model (events, positions, answers), errors, links (the WebSocket and SSE
wire), resume (reconnecting and resuming), answers, session, api (``Client``).
"""

from __future__ import annotations

from shared.client.answers import AnswerStream
from shared.client.api import Client
from shared.client.errors import ConnectionLostError, ResyncError, TokenbusError

# Internal, but imported by name elsewhere (tests): re-exported explicitly.
from shared.client.links import _SseLink as _SseLink
from shared.client.links import _WsLink as _WsLink
from shared.client.model import START as START
from shared.client.model import Answer, EventDict, Position, Transport, Usage
from shared.client.session import Session

__all__ = [
    "Answer",
    "AnswerStream",
    "Client",
    "ConnectionLostError",
    "EventDict",
    "Position",
    "ResyncError",
    "Session",
    "TokenbusError",
    "Transport",
    "Usage",
]
