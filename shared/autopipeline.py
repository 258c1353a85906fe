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
pipeline once the retries (as redis-py's for any command: resent on a new connection) are spent.

Over a ``Wire`` (the worker's and the gateway's own connection) a round trip skips redis-py's
per-command machinery; over a redis-py client it is one redis-py pipeline.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from shared.wire import Wire

#: Resends of a round trip whose connection failed, and the first pause between them (doubling):
#: as redis-py's retry does for the other clients (shared.redis_client).
RETRIES = 3
RETRY_PAUSE_S = 0.05


class AutoPipeline:
    def __init__(self, redis: Redis | Wire) -> None:
        self._redis = redis
        self._queued: list[tuple[tuple[EncodableT, ...], asyncio.Future[Any]]] = []
        # Commands that may wait for the next round trip (``within``), and when they must go.
        self._riders: list[tuple[tuple[EncodableT, ...], asyncio.Future[Any]]] = []
        self._riders_due: asyncio.TimerHandle | None = None
        self._riders_at = 0.0  # loop time the timer fires (uvloop's handles lack when())
        self._sending: set[asyncio.Task[None]] = set()
        self._shas: dict[str, str] = {}
        self.round_trips = 0
        self.commands = 0

    def call(self, *args: EncodableT, within: float = 0.0) -> asyncio.Future[Any]:
        """Queue one command (``"HSET", key, field, value``); its reply, parsed as redis-py does.

        ``within`` (seconds): the command may wait that long for a round trip that goes anyway
        (another caller's, a publish flush) and ride with it; it goes alone only once the time
        is up. For commands whose reply nobody is in a hurry for (a job's final record, its ack).
        """
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if within > 0.0:
            self._riders.append((args, reply))
            due = loop.time() + within
            if self._riders_due is None or due < self._riders_at:
                if self._riders_due is not None:
                    self._riders_due.cancel()
                self._riders_due = loop.call_at(due, self._send_riders)
                self._riders_at = due
            return reply
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

    async def script(
        self,
        source: str,
        keys: Sequence[str],
        args: Sequence[EncodableT],
        *,
        within: float = 0.0,
    ) -> Any:
        """Run a Lua script by its SHA, loading it once where Redis does not know it (a new or
        restarted server). ``within``: as for ``call``."""
        sha = self.sha(source)
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args, within=within)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", source)
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    def sha(self, source: str) -> str:
        """The SHA1 a script's EVALSHA names it by (computed once per source)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        return sha

    def _send_riders(self) -> None:
        self._riders_due = None
        if self._riders and not self._queued:
            self._send()

    def _send(self) -> None:
        queued, self._queued = self._queued, []
        if self._riders:  # queued before this tick's commands: they go first
            queued[:0] = self._riders
            self._riders = []
            if self._riders_due is not None:
                self._riders_due.cancel()
                self._riders_due = None
        task = asyncio.create_task(self._execute(queued), name="autopipeline")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _execute(
        self, queued: list[tuple[tuple[EncodableT, ...], asyncio.Future[Any]]]
    ) -> None:
        self.round_trips += 1
        self.commands += len(queued)
        try:
            if isinstance(self._redis, Wire):
                replies = await self._over_wire(self._redis, [args for args, _ in queued])
            else:
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

    async def _over_wire(self, wire: Wire, commands: list[tuple[EncodableT, ...]]) -> list[Any]:
        pause = RETRY_PAUSE_S
        for attempt in range(RETRIES + 1):
            futures: list[asyncio.Future[Any]] = []
            try:
                futures = await wire.execute(commands)
                replies: list[Any] = []
                for future in futures:
                    try:
                        replies.append(await future)
                    except (RedisConnectionError, RedisTimeoutError):
                        raise
                    except Exception as exc:  # an error reply: its own caller's
                        replies.append(exc)
                return replies
            except (RedisConnectionError, RedisTimeoutError):
                for future in futures:  # the rest failed with it: seen, not logged as lost
                    if future.done() and not future.cancelled():
                        future.exception()
                if attempt == RETRIES:
                    raise
                await asyncio.sleep(pause)
                pause *= 2
        raise AssertionError("unreachable")
