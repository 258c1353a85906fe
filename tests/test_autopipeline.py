"""Auto-pipelining on a real Redis: one round trip per tick, each caller its own reply."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared.autopipeline import AutoPipeline
from shared.codec import text
from shared.jobs import settle
from shared.keys import JOBS_GROUP, Keys

pytestmark = pytest.mark.asyncio


async def test_commands_of_one_tick_share_a_round_trip_in_order(keys: Keys, redis: Redis) -> None:
    calls = AutoPipeline(redis)
    key = f"{keys.prefix}:ap:list"

    async def push(i: int) -> int:
        return int(await calls.call("RPUSH", key, i))

    lengths = await asyncio.gather(*(push(i) for i in range(50)))
    assert sorted(lengths) == list(range(1, 51))  # each caller got its own reply
    assert await redis.lrange(key, 0, -1) == [str(i).encode() for i in range(50)]
    assert calls.round_trips == 1 and calls.commands == 50
    # One after another (each awaited before the next is queued): one trip each.
    for i in range(3):
        await calls.call("RPUSH", key, 50 + i)
    assert calls.round_trips == 4


async def test_an_error_reply_fails_only_its_own_caller(keys: Keys, redis: Redis) -> None:
    calls = AutoPipeline(redis)
    await redis.set(f"{keys.prefix}:ap:str", "text")
    results = await asyncio.gather(
        calls.call("INCR", f"{keys.prefix}:ap:n"),
        calls.call("INCR", f"{keys.prefix}:ap:str"),  # not an integer: an error reply
        calls.call("INCR", f"{keys.prefix}:ap:n"),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)
    assert calls.round_trips == 1 and calls.commands == 3


async def test_a_script_is_loaded_again_after_redis_forgot_it(keys: Keys, redis: Redis) -> None:
    calls = AutoPipeline(redis)
    source = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    key = f"{keys.prefix}:ap:script"
    assert await calls.script(source, [key], [2]) == 2
    await redis.script_flush()  # as after a restart without persistence
    assert await calls.script(source, [key], [3]) == 5


async def test_a_lost_connection_fails_every_caller_of_the_trip() -> None:
    # Nothing listens on port 1: the pipeline cannot connect.
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    calls = AutoPipeline(dead)
    results = await asyncio.gather(calls.call("PING"), calls.call("PING"), return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results)
    await dead.aclose()


async def test_settle_records_the_state_then_acknowledges(keys: Keys, redis: Redis) -> None:
    stream = keys.jobs_stream("ap-model")
    await redis.xgroup_create(stream, JOBS_GROUP, id="0", mkstream=True)
    entry = text(await redis.xadd(stream, {"job": "x"}))
    await redis.xreadgroup(JOBS_GROUP, "w1", {stream: ">"})
    calls = AutoPipeline(redis)
    await settle(calls, keys, "job-ap", "done", 60, stream=stream, entry_id=entry, finish="stop")
    record = await redis.hgetall(keys.job("job-ap"))
    assert record[b"state"] == b"done" and record[b"finish"] == b"stop"
    assert record[b"entry_id"] == entry.encode()
    assert 0 < await redis.ttl(keys.job("job-ap")) <= 60
    assert (await redis.xpending(stream, JOBS_GROUP))["pending"] == 0
    assert calls.round_trips == 1 and calls.commands == 3


async def test_a_transaction_is_all_or_nothing_and_stays_together(keys: Keys, redis: Redis) -> None:
    calls = AutoPipeline(redis)
    key = f"{keys.prefix}:ap:tx"

    async def tx(i: int) -> list[object]:
        return await calls.transaction(("RPUSH", key, f"{i}a"), ("RPUSH", key, f"{i}b"))

    replies = await asyncio.gather(*(tx(i) for i in range(10)))
    assert all(len(r) == 2 for r in replies)
    items = [text(v) for v in await redis.lrange(key, 0, -1)]
    # Each caller's pair is adjacent: nothing of another caller's came between.
    assert [items[i][:-1] == items[i + 1][:-1] for i in range(0, 20, 2)] == [True] * 10
    assert calls.round_trips == 1
    with pytest.raises(ResponseError):  # a malformed command aborts the whole transaction
        await calls.transaction(("RPUSH", key, "never"), ("RPUSH", key))
    assert "never" not in [text(v) for v in await redis.lrange(key, 0, -1)]
