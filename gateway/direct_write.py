"""Writing a live event straight to a client's socket, from the hub's reader.

Each connection has one write loop (a task) that takes events from its outbox and writes them
through aiohttp. Per event that cost a task switch and three coroutines (``write_within``,
``StreamResponse.write``, ``StreamWriter.write``): most of the gateway's own CPU per token,
beside the send itself. When the loop is parked (nothing queued, no write under way) and the
transport's buffer has room, ``Outbox.put`` calls one of these instead and the frame goes
into the transport at once; anything else (a full buffer, a closing transport, a compressed
WebSocket) returns False and the event takes the write loop as before, so slow clients are
still bounded by the outbox and the stall timeout.

The bytes are exactly what aiohttp would write: an HTTP/1.1 chunk for an SSE response (whose
headers aiohttp has sent already, with ``Transfer-Encoding: chunked``), an unmasked text frame
for a WebSocket (RFC 6455 section 5.2; a server never masks).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from aiohttp import web

from gateway.outbox import Direct, Outgoing
from shared.protocol import EventDict

#: Told each event written this way (metrics).
Written = Callable[[EventDict], None]
Frame = Callable[[Outgoing], bytes]


def sse_writer(
    response: web.StreamResponse,
    transport: asyncio.Transport | None,
    frame: Frame,
    written: Written,
) -> Direct | None:
    """A direct writer for a prepared SSE response, or None where its body is not chunked."""
    if transport is None or response.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return None

    def chunk(out: Outgoing) -> bytes:
        data = frame(out)
        return b"%x\r\n%b\r\n" % (len(data), data)

    return _writer(transport, chunk, written)


def ws_writer(
    ws: web.WebSocketResponse, transport: asyncio.Transport | None, written: Written
) -> Direct | None:
    """A direct writer for an open WebSocket, or None where its frames are compressed."""
    if transport is None or ws.compress:
        return None

    def frame(out: Outgoing) -> bytes:
        if ws.closed:
            return b""
        return text_frame(out.text().encode())

    return _writer(transport, frame, written)


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame carrying ``payload``."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def _writer(transport: asyncio.Transport, encode: Frame, written: Written) -> Direct:
    high = transport.get_write_buffer_limits()[1]

    def write(out: Outgoing) -> bool:
        if transport.is_closing():
            return False
        data = encode(out)
        if not data or transport.get_write_buffer_size() + len(data) > high:
            return False
        transport.write(data)
        written(out.event)
        return True

    return write
