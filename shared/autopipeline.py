"""Auto-pipelining: the Redis commands many tasks issue in one loop tick leave in one round trip.

A worker runs hundreds of jobs at once, and each job's bookkeeping is a command or two at a
time: take its lease, mark it running, record how it ended, acknowledge its entry. Sent one by
one, each paid a round trip of its own, and on small machines a round trip (a send, a wake-up
of Redis, a reply, a wake-up of the worker) costs far more CPU than the command: measured with
``tokenbus bench``, four such round trips per job were most of what a worker spent on a short
answer. Jobs read together start together and jobs whose ends land in one flush finish
together, so their commands meet in the same tick: ``call`` queues a command and the queue
leaves as one pipeline (not a transaction) once the tick's ready tasks have run.

Order: commands queued in one tick are sent in the order they were queued; a task that awaits
one command before queuing the next sees them applied in that order. Errors are per command:
one command's error reply fails only its caller; a lost connection fails every caller of that
pipeline (redis-py's retry, as for any command, resends it first).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT


class AutoPipeline:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queued: list[tuple[tuple[EncodableT, ...], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._shas: dict[str, str] = {}
        self.round_trips = 0
        self.commands = 0

    def call(self, *args: EncodableT) -> asyncio.Future[Any]:
        """Queue one command (``"HSET", key, field, value``); its reply, parsed as redis-py does."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            # After the tasks ready now have run: what they queue meanwhile goes too.
            loop.call_soon(self._send)
        self._queued.append((args, reply))
        return reply

    async def transaction(self, *commands: tuple[EncodableT, ...]) -> list[Any]:
        """Queue ``commands`` between MULTI and EXEC, together (nothing of another caller's in
        between): applied all at once or not at all; their replies, in order."""
        replies = [self.call("MULTI"), *(self.call(*c) for c in commands), self.call("EXEC")]
        done = await asyncio.gather(*replies, return_exceptions=True)
        for reply in (done[-1], *done[:-1]):  # EXEC's error (EXECABORT) says the most
            if isinstance(reply, BaseException):
                raise reply
        return cast(list[Any], done[-1])

    async def script(self, source: str, keys: Sequence[str], args: Sequence[EncodableT]) -> Any:
        """Run a Lua script by its SHA, loading it once where Redis does not know it (a new or
        restarted server)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.script_load(source)
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    def _send(self) -> None:
        queued, self._queued = self._queued, []
        task = asyncio.create_task(self._execute(queued), name="autopipeline")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _execute(
        self, queued: list[tuple[tuple[EncodableT, ...], asyncio.Future[Any]]]
    ) -> None:
        self.round_trips += 1
        self.commands += len(queued)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args, _ in queued:
                    pipe.execute_command(*args)
                replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, reply in queued:
                reply.cancel()
            raise
        except Exception as exc:  # the whole round trip failed: so did every command in it
            for _, reply in queued:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for (_, reply), value in zip(queued, replies, strict=True):
            if reply.done():  # its caller gave up (cancelled)
                continue
            if isinstance(value, Exception):
                reply.set_exception(value)
            else:
                reply.set_result(value)
