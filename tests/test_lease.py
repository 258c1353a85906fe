"""Leases and fenced publishing, script level: shared/lease.lua and publish.lua on a real Redis.

Every case drives the scripts the way workers do (``Leases``, ``SessionPublisher``) and then
reads Redis itself: what a refused writer left behind is checked key by key, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.codec import text as text_of
from shared.keys import META_TTL_FIELD, Keys, Lease
from shared.lease import Acquired, Busy, Done, Leases
from shared.protocol import Delta, StreamEnd, StreamStart
from shared.scripts import pack_ids, unpack_ids
from shared.stream.position import HISTORY_FIELD
from shared.stream.publish import Fence, LostWrites, Published, SessionPublisher, StaleFence

SID, JID = "sess-lease", "job-lease"
SPACE = "engine:model-a"
WAIT_S = 10.0  # a failsafe for a hung test, never a speed requirement


async def stored_ids(redis: Redis, key: str) -> list[int]:
    """Token ids stored at ``key`` (packed little-endian uint32), unpacked."""
    raw = await redis.get(key)
    assert raw is None or isinstance(raw, bytes)
    return unpack_ids(raw or b"")


@pytest.fixture
def leases(redis: Redis, keys: Keys) -> Leases:
    return Leases(redis, keys, ttl_s=0.3, keep_s=600)


@pytest.fixture
def sessions(redis: Redis, keys: Keys) -> SessionPublisher:
    return SessionPublisher(redis, keys, history_maxlen=1000, ttl_s=3600)


async def acquire(leases: Leases, owner: str, entry: str = "1-0", space: str = SPACE) -> Acquired:
    got = await leases.acquire(SID, JID, owner=owner, entry_id=entry, space=space)
    assert isinstance(got, Acquired), got
    return got


async def acquire_after_lapse(
    leases: Leases, owner: str, entry: str = "1-0", space: str = SPACE
) -> Acquired:
    """Acquire once the current holder's lease lapsed (polled: Busy until then)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            got = await leases.acquire(SID, JID, owner=owner, entry_id=entry, space=space)
            if isinstance(got, Acquired):
                return got
            assert isinstance(got, Busy), got
            await asyncio.sleep(got.ms_left / 1000 + 0.01)


def delta(text: str, tokens: int = 1) -> Delta:
    return Delta(job_id=JID, delta=text, tokens=tokens, t=time.time())


async def publish(
    sessions: SessionPublisher,
    fence: Fence,
    text: str,
    ids: list[int] | None = None,
    *,
    terminal: bool = False,
) -> Published:
    ids = [] if ids is None else ids
    events: list[Any] = [delta(text, len(ids))] if text else []
    if terminal:
        events.append(StreamEnd(job_id=JID, finish_reason="stop"))
    return await sessions.publish_batch(
        SID,
        events,
        job_id=JID,
        text=text,
        fence=fence,
        token_ids=ids,
        tokens=len(ids),
        terminal=terminal,
    )


async def snapshot(redis: Redis, keys: Keys) -> tuple[list[dict[str, Any]], str, list[int]]:
    """The session history's events, the job's text and its token ids, as Redis holds them."""
    entries = await redis.xrange(keys.session_history(SID)) or []
    events = [json.loads((fields or {})[HISTORY_FIELD.encode()]) for _, fields in entries]
    text = text_of(await redis.get(keys.job_text(SID, JID)) or b"")
    ids = await stored_ids(redis, keys.job_token_ids(SID, JID))
    return events, text, ids


async def lease_field(redis: Redis, keys: Keys, field: str) -> str | None:
    value = await redis.hget(keys.job_lease(SID, JID), field)
    return None if value is None else text_of(value)


# Acquire, busy, lapse, fencing


async def test_a_live_lease_is_busy_and_a_lapsed_one_moves_on_with_a_larger_fence(
    redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    a = await acquire(leases, "wa", entry="1-0")
    assert (a.attempts, a.handbacks, a.failures) == (1, 0, 1)
    assert a.progress.text == "" and a.progress.tokens == 0 and not a.progress.started
    assert a.progress.token_ids == ()  # nothing published yet: an empty answer in its space
    await publish(sessions, a.fence, "Hello", [7, 8])

    busy = await leases.acquire(SID, JID, owner="wb", entry_id="1-0", space=SPACE)
    assert isinstance(busy, Busy)
    assert (busy.owner, busy.entry_id) == ("wa", "1-0")
    assert 0 < busy.ms_left <= leases.ttl_ms

    b = await acquire_after_lapse(leases, "wb")
    assert int(b.fence.token) > int(a.fence.token)
    assert (b.attempts, b.handbacks, b.failures) == (2, 0, 2)
    assert b.progress.text == "Hello" and b.progress.token_ids == (7, 8)
    assert b.progress.tokens == 2 and b.progress.started
    assert await lease_field(redis, keys, Lease.OWNER) == "wb"

    # The earlier holder is refused, atomically: nothing of its batch reaches Redis.
    before = await snapshot(redis, keys)
    with pytest.raises(StaleFence):
        await publish(sessions, a.fence, " stale", [9])
    with pytest.raises(StaleFence):
        await publish(sessions, a.fence, "", terminal=True)
    assert await snapshot(redis, keys) == before
    assert await lease_field(redis, keys, Lease.DONE) is None
    assert not await leases.renew(SID, JID, owner="wa", fence=a.fence)
    assert not await leases.release(SID, JID, owner="wa", fence=a.fence)
    # The holder's own renewal goes on working.
    assert await leases.renew(SID, JID, owner="wb", fence=b.fence)
    assert await lease_field(redis, keys, Lease.OWNER) == "wb"


async def test_renewal_keeps_a_lease_past_its_ttl(redis: Redis, keys: Keys, leases: Leases) -> None:
    a = await acquire(leases, "wa")
    for _ in range(5):  # 5 x 0.1 s: past the 0.3 s TTL, renewed all along
        await asyncio.sleep(0.1)
        assert await leases.renew(SID, JID, owner="wa", fence=a.fence)
    got = await leases.acquire(SID, JID, owner="wb", entry_id="1-0", space=SPACE)
    assert isinstance(got, Busy) and got.owner == "wa"


# Batches: retried, lost, and a lease Redis forgot


async def test_a_retried_batch_is_applied_once(
    redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    a = await acquire(leases, "wa")
    first = await sessions.publish_batch(
        SID, [StreamStart(job_id=JID, model="m")], job_id=JID, fence=a.fence
    )
    assert not first.duplicate
    applied = await publish(sessions, a.fence, "Hi", [1, 2])
    assert not applied.duplicate and a.fence.seq == 2
    after_first = await snapshot(redis, keys)

    a.fence.seq -= 1  # the reply was lost: the caller sends the same batch again
    again = await publish(sessions, a.fence, "Hi", [1, 2])
    assert again.duplicate
    assert (again.epoch, again.offset) == (applied.epoch, applied.offset)
    assert await snapshot(redis, keys) == after_first
    events, text, ids = after_first
    assert [e["type"] for e in events] == ["stream_start", "delta"]
    assert (text, ids) == ("Hi", [1, 2])
    assert await lease_field(redis, keys, Lease.TOKENS) == "2"

    # And the next batch follows on as if nothing happened.
    await publish(sessions, a.fence, " there", [3])
    events, text, ids = await snapshot(redis, keys)
    assert [e["offset"] for e in events] == [1, 2, 3]
    assert (text, ids) == ("Hi there", [1, 2, 3])


async def test_a_skipped_batch_means_lost_writes_and_a_new_epoch(
    redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    a = await acquire(leases, "wa")
    done = await publish(sessions, a.fence, "one", [1])
    await publish(sessions, a.fence, " two", [2])
    # As if Redis came back from a state before the second batch: this attempt's next batch
    # is seq 3, but Redis applied only seq 1.
    await redis.hset(keys.job_lease(SID, JID), Lease.SEQ, 1)
    with pytest.raises(LostWrites):
        await publish(sessions, a.fence, " three", [3])
    meta = await redis.hgetall(keys.session_meta(SID))
    assert text_of(meta[b"epoch"]) != done.epoch
    assert meta[b"offset"] == b"0"
    assert await redis.xlen(keys.session_history(SID)) == 0


@pytest.mark.parametrize("lost", ["smaller fence", "no lease"])
async def test_a_lease_redis_forgot_means_lost_writes(
    lost: str, redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    await acquire(leases, "wa")
    await acquire_after_lapse(leases, "wb")
    c = await acquire_after_lapse(leases, "wc")
    done = await publish(sessions, c.fence, "text", [1])
    assert c.fence.token == "3"
    if lost == "smaller fence":  # Redis restarted from a snapshot taken at fence 2
        await redis.hset(keys.job_lease(SID, JID), Lease.FENCE, 2)
    else:  # Redis restarted without the lease at all
        await redis.delete(keys.job_lease(SID, JID))
    with pytest.raises(LostWrites):
        await publish(sessions, c.fence, " more", [2])
    epoch = await redis.hget(keys.session_meta(SID), "epoch")
    assert epoch is not None and text_of(epoch) != done.epoch
    assert await redis.xlen(keys.session_history(SID)) == 0


# Release, done


async def test_release_lets_another_owner_in_at_once_and_counts_a_handback(
    redis: Redis, keys: Keys, sessions: SessionPublisher
) -> None:
    long_leases = Leases(redis, keys, ttl_s=30, keep_s=600)
    a = await long_leases.acquire(SID, JID, owner="wa", entry_id="1-0", space=SPACE)
    assert isinstance(a, Acquired)
    await publish(sessions, a.fence, "part", [4])
    assert await long_leases.release(SID, JID, owner="wa", fence=a.fence)
    assert not await long_leases.release(SID, JID, owner="wa", fence=a.fence)  # once

    b = await long_leases.acquire(SID, JID, owner="wb", entry_id="1-0", space=SPACE)
    assert isinstance(b, Acquired)  # not Busy, though the 30 s TTL is far from over
    assert (b.attempts, b.handbacks, b.failures) == (2, 1, 1)
    assert int(b.fence.token) > int(a.fence.token) + 1  # release moved the fence too
    assert b.progress.text == "part" and b.progress.token_ids == (4,)
    before = await snapshot(redis, keys)
    with pytest.raises(StaleFence):
        await publish(sessions, a.fence, " late", [5])
    assert await snapshot(redis, keys) == before


async def test_the_terminal_batch_marks_the_lease_done_for_good(
    redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    a = await acquire(leases, "wa", entry="5-0")
    await publish(sessions, a.fence, "all of it", [1, 2, 3], terminal=True)
    assert await lease_field(redis, keys, Lease.DONE) == "1"
    assert await lease_field(redis, keys, Lease.OWNER) == ""
    before = await snapshot(redis, keys)
    assert [e["type"] for e in before[0]] == ["delta", "stream_end"]

    # Done, even once the TTL would have lapsed, for another owner and for the same one.
    await asyncio.sleep(leases.ttl_ms / 1000)
    for owner in ("wb", "wa"):
        got = await leases.acquire(SID, JID, owner=owner, entry_id="6-0", space=SPACE)
        assert got == Done("5-0")
    assert not await leases.renew(SID, JID, owner="wa", fence=a.fence)
    assert not await leases.release(SID, JID, owner="wa", fence=a.fence)
    with pytest.raises(StaleFence):  # the holder's next batch
        await publish(sessions, a.fence, " more", [4])
    with pytest.raises(StaleFence):  # an older holder's
        await publish(sessions, Fence("0"), "x", [4])
    assert await snapshot(redis, keys) == before
    assert await lease_field(redis, keys, Lease.ATTEMPTS) == "1"


# What a new holder continues from


def test_token_ids_pack_as_little_endian_uint32() -> None:
    ids = [0, 1, 255, 256, 65_535, 2**32 - 1]
    packed = pack_ids(ids)
    assert len(packed) == 4 * len(ids)
    assert packed[4:8] == b"\x01\x00\x00\x00"
    assert unpack_ids(packed) == ids
    assert unpack_ids(packed + b"\x07\x00") == ids  # a torn tail is not an id
    assert unpack_ids(b"") == []


async def test_ids_go_to_a_holder_of_the_same_space_only(
    redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    a = await acquire(leases, "wa", space=SPACE)
    await publish(sessions, a.fence, "Hel", [70_000, 3])
    await publish(sessions, a.fence, "lo", [2**31])
    assert await stored_ids(redis, keys.job_token_ids(SID, JID)) == [70_000, 3, 2**31]

    same = await acquire_after_lapse(leases, "wb", space=SPACE)
    assert same.progress.token_ids == (70_000, 3, 2**31)
    assert (same.progress.text, same.progress.tokens) == ("Hello", 3)

    other = await acquire_after_lapse(leases, "wc", space="engine:model-b")
    assert other.progress.token_ids is None  # continues from the text
    assert (other.progress.text, other.progress.tokens) == ("Hello", 3)
    assert await lease_field(redis, keys, Lease.SPACE) == "-"
    await publish(sessions, other.fence, " world", [11])

    # From now on no attempt gets ids, whatever its space: they no longer describe the answer.
    for owner, space in (("wd", SPACE), ("we", "engine:model-b")):
        later = await acquire_after_lapse(leases, owner, space=space)
        assert later.progress.token_ids is None
        assert later.progress.text == "Hello world" and later.progress.tokens == 4


async def test_text_without_ids_is_continued_from_the_text(
    redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    # An engine that reports no ids (or an answer from before ids were kept) published text.
    a = await acquire(leases, "wa")
    await sessions.publish_batch(
        SID, [delta("Bonjour")], job_id=JID, text="Bonjour", fence=a.fence, tokens=1
    )
    b = await acquire_after_lapse(leases, "wb")
    assert b.progress.token_ids is None
    assert (b.progress.text, b.progress.tokens, b.progress.started) == ("Bonjour", 1, True)


async def test_a_session_ttl_applies_to_every_key_publish_touches(
    redis: Redis, keys: Keys, leases: Leases, sessions: SessionPublisher
) -> None:
    await redis.hset(keys.session_meta(SID), META_TTL_FIELD, 45)
    a = await acquire(leases, "wa")
    assert await redis.ttl(keys.job_lease(SID, JID)) > 45  # keep_s until the first batch
    await publish(sessions, a.fence, "short", [1])
    for key in (
        keys.session_meta(SID),
        keys.session_history(SID),
        keys.job_text(SID, JID),
        keys.job_token_ids(SID, JID),
        keys.job_lease(SID, JID),
    ):
        assert 0 < await redis.ttl(key) <= 45, key
