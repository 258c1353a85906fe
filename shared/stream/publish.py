"""Publishing on a session: the one atomic step (history + PUBLISH), fenced by a job's lease.

publish.lua stamps each event with the session's epoch and next offset, appends it to the
history stream and PUBLISHes it; a job's own batches are fenced by its lease (``Fence``), so a
worker whose job moved on publishes nothing more. ``publish_many`` sends many sessions' batches
in one round trip: a pipeline of one script call per batch, each touching one session's keys
(one hash tag, one cluster slot), so it stays correct when the keys are spread over a cluster.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import codec
from shared.autopipeline import AutoPipeline
from shared.codec import AnyEvent, encode_event
from shared.keys import Keys
from shared.protocol import Delta
from shared.scripts import load_script, pack_ids, script_source


@dataclass(slots=True)
class Fence:
    """The right to publish a job's events: its lease's fencing token and the next batch.

    ``seq`` numbers the batches of one attempt, so a batch retried after its reply was lost
    (a dropped connection) is recognised and not published twice.
    """

    token: str
    seq: int = 0


class StaleFence(Exception):
    """The job's lease moved on (taken over, handed back, or finished): publish nothing more."""


class LostWrites(Exception):
    """Redis no longer holds what this attempt published (it restarted from an older state).

    The session got a new epoch, so its followers resync rather than see reused offsets.
    """


@dataclass(frozen=True, slots=True)
class Published:
    epoch: str
    offset: int  # of the last event
    duplicate: bool = False  # the batch had been applied already (a retried call)


@dataclass(slots=True)
class Batch:
    """One script call: events for one session, and with ``fence`` one batch of a job's answer.

    ``events`` are encoded already (``encode_event``/``encode_delta``): JSON objects without
    epoch and offset, which the script puts in front.
    """

    session_id: str
    events: list[str]
    job_id: str = "_"
    text: str = ""
    fence: Fence | None = None
    token_ids: Sequence[int] = ()
    tokens: int = 0
    terminal: bool = False


def encode_delta(job_id: str, text: str, tokens: int, t: float) -> str:
    """``encode_event(Delta(...))``, byte for byte, without building the model (the hot path)."""
    try:
        data = orjson.dumps(
            {"type": "delta", "job_id": job_id, "delta": text, "tokens": tokens, "t": t}
        )
    except TypeError:  # a lone surrogate, which orjson refuses: the model's encoder escapes it
        return encode_event(Delta(job_id=job_id, delta=text, tokens=tokens, t=t))
    return data.decode()


class SessionPublisher:
    """Publishes events on sessions: one atomic script call per batch."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        history_maxlen: int,
        ttl_s: int,
        calls: AutoPipeline | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._maxlen = str(history_maxlen)
        self._ttl = str(ttl_s)
        self._script = load_script(redis, "stream/publish")
        self._source = script_source("stream/publish")
        # Given the worker's AutoPipeline, a flush shares its round trip with the bookkeeping
        # (leases, records, acks) issued in the same tick.
        self._calls = calls

    async def publish(
        self, session_id: str, events: Sequence[AnyEvent], *, job_id: str = "_", text: str = ""
    ) -> tuple[str, int]:
        """Publish ``events`` in order, unfenced; returns the epoch and the last event's offset."""
        result = await self.publish_batch(session_id, events, job_id=job_id, text=text)
        return result.epoch, result.offset

    async def publish_batch(
        self,
        session_id: str,
        events: Sequence[AnyEvent],
        *,
        job_id: str = "_",
        text: str = "",
        fence: Fence | None = None,
        token_ids: Sequence[int] = (),
        tokens: int = 0,
        terminal: bool = False,
    ) -> Published:
        """Publish ``events`` in order; with ``fence``, as one batch of the job's answer.

        ``text``, ``token_ids`` and ``tokens`` are appended to the job's progress and
        ``terminal`` marks it finished. Raises StaleFence or LostWrites instead of publishing
        when the lease says so.
        """
        batch = Batch(
            session_id,
            [encode_event(e) for e in events],
            job_id=job_id,
            text=text,
            fence=fence,
            token_ids=token_ids,
            tokens=tokens,
            terminal=terminal,
        )
        keys, args = self._call(batch)
        return self._result(batch, await self._script(keys=keys, args=args))

    async def publish_many(self, batches: Sequence[Batch]) -> list[Published | Exception]:
        """Every batch in one round trip; each one's result, or the exception it alone met.

        A connection error raises (nothing says which calls were applied): the caller sends the
        same batches again, and the script recognises each fenced batch it applied already.
        """
        if not batches:
            return []
        calls = [self._call(b) for b in batches]
        replies = await self._send(calls)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its script cache (a restart): load it, then resend only those calls,
            # which did not run.
            self._script.sha = await self._redis.script_load(self._script.script)
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            for i, reply in zip(again, await self._send([calls[i] for i in again]), strict=True):
                replies[i] = reply
        results: list[Published | Exception] = []
        for batch, reply in zip(batches, replies, strict=True):
            if isinstance(reply, Exception):
                results.append(reply)
                continue
            try:
                results.append(self._result(batch, reply))
            except (StaleFence, LostWrites) as exc:
                results.append(exc)
        return results

    async def _send(self, calls: list[tuple[list[str], list[str | bytes]]]) -> list[object]:
        """One round trip of script calls; each call's reply or error reply, in order."""
        if self._calls is not None:
            return await self._auto(self._calls, calls)
        return await self._pipeline(calls)

    async def _auto(
        self, auto: AutoPipeline, calls: list[tuple[list[str], list[str | bytes]]]
    ) -> list[object]:
        # Futures straight from the autopipeline: a task per call (gather of coroutines) cost
        # more than the call itself on a flush of hundreds.
        sha = auto.sha(self._source)
        futures = [auto.call("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        replies: list[object] = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, (RedisConnectionError, RedisTimeoutError)):
                raise reply  # nothing says which calls were applied: the caller sends them again
            if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                raise reply
        return replies

    async def _pipeline(self, calls: list[tuple[list[str], list[str | bytes]]]) -> list[object]:
        # EVALSHA queued directly: redis-py's script-aware pipeline asks SCRIPT EXISTS first,
        # a second round trip on every flush.
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            replies: list[object] = await pipe.execute(raise_on_error=False)
        return replies

    def _call(self, batch: Batch) -> tuple[list[str], list[str | bytes]]:
        k, sid, job_id, fence = self._keys, batch.session_id, batch.job_id, batch.fence
        keys = [
            k.session_meta(sid),
            k.session_history(sid),
            k.session_channel(sid),
            k.job_text(sid, job_id),
            k.job_lease(sid, job_id),
            k.job_token_ids(sid, job_id),
        ]
        args: list[str | bytes] = [
            secrets.token_hex(6),
            self._maxlen,
            self._ttl,
            batch.text,
            fence.token if fence is not None else "",
            str(fence.seq + 1 if fence is not None else 0),
            pack_ids(batch.token_ids) if fence is not None else b"",
            str(batch.tokens if fence is not None else 0),
            "1" if batch.terminal and fence is not None else "0",
        ]
        args.extend(batch.events)
        return keys, args

    def _result(self, batch: Batch, reply: Any) -> Published:
        status = codec.text(reply[0])
        job_id = batch.job_id
        if status == "stale":
            raise StaleFence(f"job {job_id}: the lease is at fence {codec.text(reply[1])!r}")
        if status == "gap":
            raise LostWrites(f"job {job_id}: Redis lost published batches; new epoch")
        if batch.fence is not None:
            batch.fence.seq += 1
        return Published(codec.text(reply[1]), int(reply[2]), duplicate=status == "dup")


__all__ = [
    "Batch",
    "Fence",
    "LostWrites",
    "Published",
    "SessionPublisher",
    "StaleFence",
    "encode_delta",
]
