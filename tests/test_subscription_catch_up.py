"""Catch-up is single-flight: a reason to catch up during a replay never starts a second one.

Real Redis, a real hub and a real lost pub/sub connection (CLIENT KILL), no gateway around them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from gateway.hub import Hub
from gateway.outbox import Outbox
from gateway.subscription import Phase, SessionSubscription
from shared.keys import Keys
from shared.protocol import Delta, StreamStart, new_id
from shared.redis_client import connect
from shared.settings import Settings
from shared.stream.history import History
from shared.stream.publish import SessionPublisher


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[Hub]:
    hub = Hub(connect(settings, retries=0))
    await hub.start()
    yield hub
    await hub.close()


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


def _live(sub: SessionSubscription) -> bool:
    return sub.phase is Phase.LIVE


async def test_a_resubscribe_during_the_first_replay_delivers_each_event_once(
    settings: Settings, redis: Redis, keys: Keys, hub: Hub
) -> None:
    sid = new_id("s_")
    pub = SessionPublisher(redis, keys, history_maxlen=1000, ttl_s=600)
    await pub.publish(sid, [StreamStart(job_id="j1", model="m")])
    for i in range(20):
        await pub.publish(sid, [Delta(job_id="j1", delta=f" w{i}", t=0.0)])
    # A small queue: the replay waits for room after two events, as it would for a client
    # that reads slowly, so the first catch-up is still running when the connection drops.
    outbox = Outbox(max_events=4, max_bytes=1 << 20)
    sub = SessionSubscription(sid, hub=hub, history=History(redis, keys), keys=keys, outbox=outbox)
    starting = asyncio.create_task(sub.start())
    await _until(lambda: len(outbox) >= 2)  # the replay waits for room
    assert not starting.done() and sub.phase is Phase.CATCHING_UP

    # A lost pub/sub connection: once it is back, the hub tells the subscription to catch up.
    await redis.client_kill_filter(_type="pubsub")
    await _until(lambda: not hub.connected)  # the hub noticed
    await _until(lambda: hub.connected and hub.tracked()["recovering"] == 0)  # resubscribed

    offsets: list[int] = []
    async with asyncio.timeout(20):
        while not (starting.done() and _live(sub) and len(outbox) == 0):
            item = await outbox.get(wait_s=0.05)
            if item is not None:
                offsets.append(int(item.event["offset"]))
    await starting
    # A second catch-up, had one run beside the first, would only now be replaying.
    await asyncio.sleep(0.3)
    offsets.extend(int(item.event["offset"]) for item in outbox.take_ready(100))
    assert offsets == list(range(1, 22))
    assert sub.catch_ups == 1  # the resubscribe joined the running catch-up
    assert outbox.closed is None
    sub.close()
