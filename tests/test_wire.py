"""shared.wire on real Redis servers: replies in order, errors per command, a lost or stuck
server seen by every command in flight, and a new connection after."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.autopipeline import AutoPipeline
from shared.keys import Keys
from shared.settings import Settings
from shared.wire import Wire
from tests.restartable_redis import restartable_redis

pytestmark = pytest.mark.asyncio


async def test_replies_come_back_in_order_with_redis_types(
    settings: Settings, keys: Keys, redis: Redis
) -> None:
    wire = Wire(settings.redis_url)
    key = f"{keys.prefix}:wire:h"
    try:
        futures = await wire.execute(
            [
                ("HSET", key, "a", 1, "b", 2.5),
                ("HGET", key, "b"),
                ("HGET", key, "missing"),
                ("EVAL", "return {1, 'two', {3}}", 0),
                ("PING",),
            ]
        )
        assert [await f for f in futures] == [2, b"2.5", None, [1, b"two", [3]], b"PONG"]
        assert await redis.hget(key, "a") == b"1"  # written where the URL says
    finally:
        await wire.aclose()


async def test_an_error_reply_fails_only_its_own_command(
    settings: Settings, keys: Keys, redis: Redis
) -> None:
    wire = Wire(settings.redis_url)
    key = f"{keys.prefix}:wire:s"
    await redis.set(key, "text")
    try:
        bad, good, noscript = await wire.execute(
            [("LPUSH", key, "x"), ("GET", key), ("EVALSHA", "0" * 40, 0)]
        )
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await bad
        assert await good == b"text"
        with pytest.raises(NoScriptError):
            await noscript
        # Inside a transaction, a failed command is its own exception in EXEC's reply.
        replies = await wire.execute([("MULTI",), ("INCR", key), ("GET", key), ("EXEC",)])
        assert await replies[0] == b"OK"
        exec_reply = await replies[-1]
        assert isinstance(exec_reply[0], ResponseError) and exec_reply[1] == b"text"
    finally:
        await wire.aclose()


async def test_a_value_hiredis_cannot_pack_fails_before_anything_is_sent(
    settings: Settings,
) -> None:
    wire = Wire(settings.redis_url)
    try:
        with pytest.raises(TypeError):
            await wire.execute([("PING",), ("SET", "k", None)])  # type: ignore[list-item]
        # Nothing half-sent: the next replies still match their commands.
        (echo,) = await wire.execute([("ECHO", "still in step")])
        assert await echo == b"still in step"
    finally:
        await wire.aclose()


async def test_a_killed_server_fails_commands_in_flight_and_a_restart_is_reconnected(
    tmp_path: Path,
) -> None:
    with restartable_redis(tmp_path) as server:
        wire = Wire(server.url)
        try:
            (ping,) = await wire.execute([("PING",)])
            assert await ping == b"PONG"
            # Blocks in Redis for 10 s: still in flight when the server dies.
            (blocked,) = await wire.execute([("BLPOP", "never", 10)])
            server.kill()
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(blocked, 5)
            with pytest.raises(RedisConnectionError):  # nobody listening: no connection
                await wire.execute([("PING",)])
            server.start()
            (ping,) = await wire.execute([("PING",)])
            assert await ping == b"PONG"
        finally:
            await wire.aclose()


async def test_a_stuck_server_times_out_then_the_wire_recovers(tmp_path: Path) -> None:
    with restartable_redis(tmp_path) as server:
        wire = Wire(server.url, timeout_s=0.5)
        try:
            (ping,) = await wire.execute([("PING",)])
            await ping
            server.pause()
            try:
                (stuck,) = await wire.execute([("PING",)])
                with pytest.raises(RedisTimeoutError):
                    await asyncio.wait_for(stuck, 5)
            finally:
                server.resume()
            (ping,) = await wire.execute([("PING",)])
            assert await asyncio.wait_for(ping, 5) == b"PONG"
        finally:
            await wire.aclose()


async def test_autopipeline_over_a_wire_reconnects_after_a_restart(tmp_path: Path) -> None:
    with restartable_redis(tmp_path) as server:
        wire = Wire(server.url)
        calls = AutoPipeline(wire)
        try:
            assert await calls.call("SET", "k", "before") is not None
            server.kill()
            server.start()
            # The old connection died with the server; the next round trip opens a new one.
            assert await calls.call("GET", "k") == b"before"  # AOF, fsync always
            assert await calls.script("return 41 + 1", [], []) == 42  # loaded anew
        finally:
            await wire.aclose()


async def test_riders_wait_for_a_round_trip_that_goes_anyway(
    settings: Settings, keys: Keys
) -> None:
    wire = Wire(settings.redis_url)
    calls = AutoPipeline(wire)
    key = f"{keys.prefix}:wire:riders"
    try:
        rider = calls.call("RPUSH", key, "rider", within=5.0)
        await asyncio.sleep(0.05)
        assert not rider.done() and calls.round_trips == 0
        # Another command's trip takes the rider along, ahead of it (queued first).
        assert await calls.call("RPUSH", key, "driver") == 2
        assert await rider == 1
        assert calls.round_trips == 1
        # Alone, a rider goes once its time is up.
        late = calls.call("RPUSH", key, "alone", within=0.05)
        assert await asyncio.wait_for(late, 2) == 3
        assert calls.round_trips == 2
    finally:
        await wire.aclose()
