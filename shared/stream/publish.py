"""Publishing on a session: the one atomic step (history + PUBLISH), fenced by a job's lease.

publish.lua stamps each event with the session's epoch and next offset, appends it to the
history stream and PUBLISHes it; a job's own batches are fenced by its lease (``Fence``), so a
worker whose job moved on publishes nothing more. ``publish_many`` sends many sessions' batches
in one round trip and, on one Redis, in one script call; on a cluster (``slot_of``) one call per
hash slot, since a script may only touch keys of one slot there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import getrandbits
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

Arg = str | bytes
#: Batches one script call carries at most: Redis runs nothing else while a script runs.
MAX_BATCHES_PER_CALL = 256
_NOT_SENT: Exception = RuntimeError("batch not sent")  # a placeholder every call overwrites


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
        slot_of: Callable[[str], int] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._maxlen = str(history_maxlen)
        self._ttl = str(ttl_s)
        self._script = load_script(redis, "stream/publish")
        self._source = script_source("stream/publish")
        # Given the worker's AutoPipeline, a flush shares its round trip with the bookkeeping
        # (leases, records, acks) issued in the same tick.
        self._calls_via = calls
        # On Redis Cluster: a session's hash slot (its keys share one), to group batches by.
        self._slot_of = slot_of

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
        keys, args = self._prologue()
        self._add(batch, keys, args)
        (reply,) = await self._script(keys=keys, args=args)
        if isinstance(reply, Exception):
            raise reply
        return self._result(batch, reply)

    async def publish_many(self, batches: Sequence[Batch]) -> list[Published | Exception]:
        """Every batch in one round trip; each one's result, or the exception it alone met.

        A connection error raises (nothing says which calls were applied): the caller sends the
        same batches again, and the script recognises each fenced batch it applied already.
        """
        if not batches:
            return []
        calls = self._calls(batches)
        replies = await self._send([(keys, args) for _, keys, args in calls])
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its script cache (a restart): load it, then resend only those calls,
            # which did not run.
            self._script.sha = await self._redis.script_load(self._script.script)
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            resent = await self._send([(calls[i][1], calls[i][2]) for i in again])
            for i, reply in zip(again, resent, strict=True):
                replies[i] = reply
        results: list[Published | Exception] = [_NOT_SENT] * len(batches)
        for (indices, _, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):  # the whole call failed: each of its batches did
                for i in indices:
                    results[i] = reply
                continue
            for i, one in zip(indices, reply, strict=True):
                results[i] = self._outcome(batches[i], one)
        return results

    def _calls(self, batches: Sequence[Batch]) -> list[tuple[list[int], list[str], list[Arg]]]:
        """The script calls for ``batches``: (which batches, keys, args), in order.

        A call holds many batches; on Redis Cluster only batches whose keys share a slot can
        share a call, so with ``slot_of`` the batches are grouped by their session's slot.
        """
        calls: list[tuple[list[int], list[str], list[Arg]]] = []
        filling: dict[int, tuple[list[int], list[str], list[Arg]]] = {}  # per slot
        slot_of = self._slot_of
        for i, batch in enumerate(batches):
            slot = 0 if slot_of is None else slot_of(batch.session_id)
            call = filling.get(slot)
            if call is None or len(call[0]) >= MAX_BATCHES_PER_CALL:
                call = filling[slot] = ([], *self._prologue())
                calls.append(call)
            call[0].append(i)
            self._add(batch, call[1], call[2])
        return calls

    def _outcome(self, batch: Batch, reply: Any) -> Published | Exception:
        if isinstance(reply, Exception):
            return reply
        try:
            return self._result(batch, reply)
        except (StaleFence, LostWrites) as exc:
            return exc

    async def _send(self, calls: list[tuple[list[str], list[Arg]]]) -> list[Any]:
        """One round trip of script calls; each call's reply or error reply, in order."""
        if self._calls_via is not None:
            return await self._auto(self._calls_via, calls)
        return await self._pipeline(calls)

    async def _auto(
        self, auto: AutoPipeline, calls: list[tuple[list[str], list[Arg]]]
    ) -> list[Any]:
        # Futures straight from the autopipeline: a task per call (gather of coroutines) cost
        # more than the call itself.
        sha = auto.sha(self._source)
        futures = [auto.call("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        replies: list[Any] = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, (RedisConnectionError, RedisTimeoutError)):
                raise reply  # nothing says which calls were applied: the caller sends them again
            if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                raise reply
        return replies

    async def _pipeline(self, calls: list[tuple[list[str], list[Arg]]]) -> list[Any]:
        # EVALSHA queued directly: redis-py's script-aware pipeline asks SCRIPT EXISTS first,
        # a second round trip on every flush.
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _prologue(self) -> tuple[list[str], list[Arg]]:
        return [], [self._maxlen, self._ttl]

    def _add(self, batch: Batch, keys: list[str], args: list[Arg]) -> None:
        """Append ``batch``'s 6 keys and its args to a call (publish.lua's layout)."""
        k, sid, job_id, fence = self._keys, batch.session_id, batch.job_id, batch.fence
        keys += (
            k.session_meta(sid),
            k.session_history(sid),
            k.session_channel(sid),
            k.job_text(sid, job_id),
            k.job_lease(sid, job_id),
            k.job_token_ids(sid, job_id),
        )
        # An epoch for the session should this batch start one; unique per session matters,
        # not secrecy (no syscall per batch, as secrets would cost).
        epoch = f"{getrandbits(48):012x}"
        if fence is None:
            args += (epoch, batch.text, "", "0", b"", "0", "0", str(len(batch.events)))
        else:
            args += (
                epoch,
                batch.text,
                fence.token,
                str(fence.seq + 1),
                pack_ids(batch.token_ids),
                str(batch.tokens),
                "1" if batch.terminal else "0",
                str(len(batch.events)),
            )
        args += batch.events

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
