"""A virtual IP for Redis: a TCP forwarder whose target moves on failover, as a VIP or DNS would.

Clients (gateways, workers) connect to the forwarder's port; ``move_to`` points new connections
at the promoted replica and cuts every open one, which is what a client of a moved VIP sees.
"""

from __future__ import annotations

import asyncio
import contextlib

from shared.embedded_redis import free_port


class Vip:
    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def move_to(self, port: int) -> None:
        self.target_port = port
        for writer in list(self._open):
            writer.close()
        self._open.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.move_to(self.target_port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except asyncio.CancelledError:
            # The run is over (its loop cancels what is left): asyncio's server would print a
            # traceback per connection for a cancelled handler.
            pass
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
