"""Renewing this worker's leases from a thread of its own.

A worker whose event loop is busy (hundreds of streams on a small CPU) can fall seconds behind;
if its lease renewals waited on that loop, its leases would lapse while it is alive and well,
other workers would take its jobs over, and the jobs would bounce between busy workers until
they ran out of attempts. So a thread renews them, as long as the process lives (a killed or
stopped process renews nothing, so takeover still comes within the TTL) and its loop is not
stuck: the loop ticks a timestamp, and past ``stall_s`` without a tick the thread stops
renewing and lets the jobs go.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError

from shared.keys import JOBS_GROUP, Keys
from shared.lease import lease_keys
from shared.logs import log
from shared.scripts import script_source

logger = logging.getLogger("tokenbus.worker.leases")


@dataclass(frozen=True, slots=True)
class Held:
    session_id: str
    job_id: str
    fence: str
    entry_id: str


#: Told, on the loop, of each lease that moved on: (job id, fence).
OnLost = Callable[[str, str], None]


class LeaseKeeper:
    def __init__(
        self,
        redis_url: str,
        keys: Keys,
        *,
        stream: str,
        consumer: str,
        ttl_ms: int,
        stall_s: float,
        on_lost: OnLost,
        beat: Callable[[redis.Redis], None] | None = None,
        beat_s: float = 5.0,
    ) -> None:
        self._client = redis.Redis.from_url(
            redis_url, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self._script = self._client.register_script(script_source("lease"))
        self._keys = keys
        self._stream = stream
        self._consumer = consumer
        self._ttl_ms = ttl_ms
        self._stall_s = stall_s
        self._on_lost = on_lost
        # The worker's heartbeat goes from here too, so a busy loop never looks dead to the
        # gateways (503 no_worker) while it works.
        self._beat = beat
        self._beat_s = beat_s
        self._held: dict[str, Held] = {}
        # Read but not yet leased: under load a job may wait longer than the TTL for its first
        # lease call, and its entry must not look abandoned meanwhile.
        self._in_hand: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ticker = asyncio.create_task(self._tick_loop(), name="lease-keeper-tick")
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._thread.is_alive():  # never started when the worker failed to start
            await asyncio.to_thread(self._thread.join, 10)
        self._client.close()

    def hold(self, session_id: str, job_id: str, fence: str, entry_id: str) -> None:
        with self._lock:
            self._held[job_id] = Held(session_id, job_id, fence, entry_id)

    def take_entry(self, entry_id: str) -> None:
        """An entry this worker read and has not finished with (leased or not yet)."""
        with self._lock:
            self._in_hand.add(entry_id)

    def drop_entry(self, entry_id: str) -> None:
        with self._lock:
            self._in_hand.discard(entry_id)

    def drop(self, job_id: str, fence: str) -> None:
        with self._lock:
            held = self._held.get(job_id)
            if held is not None and held.fence == fence:
                del self._held[job_id]

    async def _tick_loop(self) -> None:
        while True:
            self._tick = time.monotonic()
            await asyncio.sleep(0.2)

    def _run(self) -> None:
        renew_s = self._ttl_ms / 3000.0
        interval = min(renew_s, self._beat_s) if self._beat is not None else renew_s
        next_beat = next_renew = 0.0
        while not self._stop.wait(interval):
            now = time.monotonic()
            stalled = now - self._tick
            if stalled > self._stall_s:
                log(logger, "loop_stalled", logging.ERROR, seconds=round(stalled, 1))
                continue  # the leases lapse: other workers take the jobs over
            if self._beat is not None and now >= next_beat:
                next_beat = now + self._beat_s
                try:
                    self._beat(self._client)
                except RedisError as exc:
                    log(logger, "heartbeat_failed", logging.WARNING, error=repr(exc))
            if now < next_renew:
                continue
            next_renew = now + renew_s
            with self._lock:
                held = list(self._held.values())
                in_hand = set(self._in_hand)
            if not held and not in_hand:
                continue
            try:
                self._renew(held, in_hand)
            except RedisError as exc:
                log(logger, "lease_renew_failed", logging.WARNING, error=repr(exc))

    def _renew(self, held: list[Held], in_hand: set[str]) -> None:
        ttl = str(self._ttl_ms)
        pipe = self._client.pipeline(transaction=False)
        for h in held:
            keys = lease_keys(self._keys, h.session_id, h.job_id)
            self._script(keys=keys, args=["renew", self._consumer, h.fence, ttl], client=pipe)
        results = pipe.execute() if held else []
        # Re-claiming its own entries resets their idle time, so XAUTOCLAIM's min-idle (the
        # TTL) means "not renewed" (workers.recovery).
        # 2: the job's end is published (its runner is finishing): nothing to renew, no loss.
        for h, ok in zip(held, results, strict=True):
            if ok == 2:
                self.drop(h.job_id, h.fence)
        lost = [h for h, ok in zip(held, results, strict=True) if not ok]
        mine = (in_hand | {h.entry_id for h in held}) - {h.entry_id for h in lost}
        if mine:
            ids: list[int | bytes | str | memoryview[int]] = []
            ids.extend(sorted(mine))
            self._client.xclaim(self._stream, JOBS_GROUP, self._consumer, 0, ids, justid=True)
        for h in lost:
            self.drop(h.job_id, h.fence)
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._on_lost, h.job_id, h.fence)
