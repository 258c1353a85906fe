"""Writing a live event straight to a client's socket, from the hub's reader.

Each connection has one write loop (a task) that takes events from its outbox and writes them
through aiohttp. Per event that cost a task switch and three coroutines (``write_within``,
``StreamResponse.write``, ``StreamWriter.write``): most of the gateway's own CPU per token,
beside the send itself. When the loop is parked (nothing queued, no write under way) and the
transport's buffer has room, ``Outbox.put`` hands the event to one of these instead: the frame
goes into the transport at the end of the loop iteration (``TickWrites``), together with the
others the same tick brought for that client. Anything else (a full buffer, a closing
transport, a compressed WebSocket) returns False and the event takes the write loop as
before, so slow clients are still bounded by the outbox and the stall timeout.

The bytes are exactly what aiohttp would write: an HTTP/1.1 chunk for an SSE response (whose
headers aiohttp has sent already, with ``Transfer-Encoding: chunked``), an unmasked text frame
for a WebSocket (RFC 6455 section 5.2; a server never masks).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from aiohttp import web

from gateway.outbox import Outgoing
from shared.protocol import EventDict

#: Told each event written this way (metrics).
Written = Callable[[EventDict], None]
Frame = Callable[[Outgoing], bytes]


class TickWrites:
    """Direct writes wait for the end of the loop iteration, so that the events one read of the
    pub/sub connection brought for the same client (a job's start and first token, its last
    tokens and its end) leave in one send: one per socket per tick, not one per event."""

    def __init__(self) -> None:
        self._due: list[DirectWriter] = []
        self._handle: asyncio.Handle | None = None

    def due(self, writer: DirectWriter) -> None:
        self._due.append(writer)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._handle = None
        due, self._due = self._due, []
        for writer in due:
            writer.flush()


class DirectWriter:
    """Writes events to one client's transport, buffered until the end of the tick."""

    def __init__(
        self, transport: asyncio.Transport, encode: Frame, written: Written, ticks: TickWrites
    ) -> None:
        self._transport = transport
        self._encode = encode
        self._written = written
        self._ticks = ticks
        self._high = transport.get_write_buffer_limits()[1]
        self._pending: list[bytes] = []
        self._size = 0
        self._detached = False

    def write(self, out: Outgoing) -> bool:
        transport = self._transport
        if self._detached or transport.is_closing():
            return False
        data = self._encode(out)
        if not data or transport.get_write_buffer_size() + self._size + len(data) > self._high:
            self.flush()  # what was taken goes before what the write loop will send
            return False
        if not self._pending:
            self._ticks.due(self)
        self._pending.append(data)
        self._size += len(data)
        self._written(out.event)
        return True

    def flush(self) -> None:
        """Send what is buffered now (the write loop calls this before it writes itself)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def detach(self) -> None:
        """Flush, then write nothing more (the response is ending)."""
        self.flush()
        self._detached = True


def sse_writer(
    response: web.StreamResponse,
    transport: asyncio.Transport | None,
    frame: Frame,
    written: Written,
    ticks: TickWrites,
) -> DirectWriter | None:
    """A direct writer for a prepared SSE response, or None where its body is not chunked."""
    if transport is None or response.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return None

    def chunk(out: Outgoing) -> bytes:
        data = frame(out)
        return b"%x\r\n%b\r\n" % (len(data), data)

    return DirectWriter(transport, chunk, written, ticks)


def ws_writer(
    ws: web.WebSocketResponse,
    transport: asyncio.Transport | None,
    written: Written,
    ticks: TickWrites,
) -> DirectWriter | None:
    """A direct writer for an open WebSocket, or None where its frames are compressed."""
    if transport is None or ws.compress:
        return None

    def frame(out: Outgoing) -> bytes:
        if ws.closed:
            return b""
        return text_frame(out.text().encode())

    return DirectWriter(transport, frame, written, ticks)


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame carrying ``payload``."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload
