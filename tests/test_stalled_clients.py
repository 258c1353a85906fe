"""A client that stops reading is cut off on the gateway's clock, not when it reads again.

The clients are raw sockets with a tiny receive buffer that, after the handshake, never read;
a publisher floods their session. The gateway must free each connection on its own: its
active_streams gauge goes back to 0 and the socket is closed from the server's side. Only that
it happens is asserted, within a bound generous enough for a loaded machine, never how fast.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from shared.keys import Keys
from shared.protocol import Delta, StreamStart
from shared.settings import Settings
from shared.stream.publish import SessionPublisher
from tests.servers import running_gateway

BOUND_S = 30.0  # a failsafe for a hung gateway, never a speed requirement
CHUNK = "z" * 65536


async def _raw_connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    return sock


async def _send_request(sock: socket.socket, url: str, headers: dict[str, str]) -> None:
    """Send an HTTP GET and read its response head (and nothing after it)."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    lines = [f"GET {parts.path}?{parts.query} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = await loop.sock_recv(sock, 1)  # byte by byte: not one byte past the head
        assert data, "server closed during the handshake"
        head += data
    assert head.split(b" ", 2)[1] in (b"101", b"200"), head


def _text_frame(payload: dict[str, Any]) -> bytes:
    """One masked (client-to-server) WebSocket text frame."""
    data = json.dumps(payload).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert len(data) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(data)) + mask + masked


async def _closed_by_server(sock: socket.socket) -> bool:
    """Read what is left (the client reads again, at last) until the server's end of it."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 1 << 16):
            pass
    except ConnectionResetError:  # aborted: a reset, not a FIN
        pass
    return True


async def _active_streams(http: aiohttp.ClientSession, base: str, transport: str) -> float:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tokenbus_active_streams" and sample.labels == {
                "transport": transport
            }:
                return sample.value
    return 0.0


@contextlib.asynccontextmanager
async def _flood(pub: SessionPublisher, sid: str) -> AsyncIterator[None]:
    """Publish large deltas on ``sid`` as fast as Redis takes them, until the block ends."""

    async def produce() -> None:
        await pub.publish(sid, [StreamStart(job_id="j1", model="m")])
        for i in range(2000):  # ~128 MiB at most; the drop comes long before
            await pub.publish(sid, [Delta(job_id="j1", delta=CHUNK, t=float(i))])

    task = asyncio.create_task(produce())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _session(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.post(f"{base}/v1/sessions") as response:
        body: dict[str, Any] = await response.json()
        return body


async def _until_active(http: aiohttp.ClientSession, base: str, transport: str, n: int) -> None:
    async with asyncio.timeout(BOUND_S):
        while True:
            if await _active_streams(http, base, transport) == n:
                return
            await asyncio.sleep(0.05)


async def test_a_websocket_that_stops_reading_is_cut_off(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    settings = settings.model_copy(update={"client_stall_s": 1.0})
    pub = SessionPublisher(redis, keys, history_maxlen=50, ttl_s=600)
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        url = session["ws_url"].replace("ws://", "http://", 1)
        sock = await _raw_connect(url)
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
        await _send_request(sock, url, {**upgrade, "Sec-WebSocket-Key": key})
        loop = asyncio.get_running_loop()
        connect = {"session_id": session["session_id"], "connect": True}
        await loop.sock_sendall(sock, _text_frame(connect))
        await _until_active(http, base, "ws", 1)
        async with _flood(pub, session["session_id"]):
            await _until_active(http, base, "ws", 0)
        assert await asyncio.wait_for(_closed_by_server(sock), BOUND_S)
        sock.close()


async def test_an_sse_stream_that_stops_reading_is_cut_off(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    settings = settings.model_copy(update={"client_stall_s": 1.0})
    pub = SessionPublisher(redis, keys, history_maxlen=50, ttl_s=600)
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sock = await _raw_connect(session["sse_url"])
        await _send_request(sock, session["sse_url"], {"Accept": "text/event-stream"})
        await _until_active(http, base, "sse", 1)
        async with _flood(pub, session["session_id"]):
            await _until_active(http, base, "sse", 0)
        assert await asyncio.wait_for(_closed_by_server(sock), BOUND_S)
        sock.close()
