"""Lua scripts and their typed callers.

Scripts that touch a job's lease get a prelude defining ``F``, the lease's field names from
``shared.keys.Lease``, so the names live in one place for Python and Lua alike.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from shared import codec
from shared.codec import AnyEvent, encode_event
from shared.keys import Keys, Lease


def _lease_fields_prelude() -> str:
    names = {k.lower(): v for k, v in vars(Lease).items() if k.isupper()}
    # "until" is a Lua keyword: the script says F.until_.
    names["until_"] = names.pop("until")
    body = ", ".join(f"{k} = '{v}'" for k, v in sorted(names.items()))
    return f"local F = {{{body}}}\n"


def script_source(name: str) -> str:
    """``shared/<name>.lua``, with the lease field prelude in front."""
    source = resources.files("shared").joinpath(f"{name}.lua").read_text()
    return _lease_fields_prelude() + source


def load_script(redis: Redis, name: str) -> AsyncScript:
    """Register ``shared/<name>.lua`` (with its prelude) on an asyncio client."""
    return redis.register_script(script_source(name))


def pack_ids(ids: Sequence[int]) -> bytes:
    """Token ids as stored beside a job's text: little-endian uint32, 4 bytes each."""
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(data: bytes) -> list[int]:
    usable = len(data) - len(data) % 4
    return list(struct.unpack(f"<{usable // 4}I", data[:usable]))


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


class SessionPublisher:
    """Publishes events on sessions: one round trip, one atomic script call per batch."""

    def __init__(self, redis: Redis, keys: Keys, *, history_maxlen: int, ttl_s: int) -> None:
        self._keys = keys
        self._maxlen = str(history_maxlen)
        self._ttl = str(ttl_s)
        self._script = load_script(redis, "publish")

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
        k = self._keys
        keys = [
            k.session_meta(session_id),
            k.session_history(session_id),
            k.session_channel(session_id),
            k.job_text(session_id, job_id),
            k.job_lease(session_id, job_id),
            k.job_token_ids(session_id, job_id),
        ]
        seq = fence.seq + 1 if fence is not None else 0
        args: list[str | bytes] = [
            secrets.token_hex(6),
            self._maxlen,
            self._ttl,
            text,
            fence.token if fence is not None else "",
            str(seq),
            pack_ids(token_ids) if fence is not None else b"",
            str(tokens if fence is not None else 0),
            "1" if terminal else "0",
        ]
        args.extend(encode_event(e) for e in events)
        reply = await self._script(keys=keys, args=args)
        status = codec.text(reply[0])
        if status == "stale":
            raise StaleFence(f"job {job_id}: the lease is at fence {codec.text(reply[1])!r}")
        if status == "gap":
            raise LostWrites(f"job {job_id}: Redis lost published batches; new epoch")
        if fence is not None:
            fence.seq = seq
        return Published(codec.text(reply[1]), int(reply[2]), duplicate=status == "dup")
