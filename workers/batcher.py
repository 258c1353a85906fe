"""The worker's publish path: every running job's pending events leave together, once a tick.

A job's publisher (``workers.publisher.JobPublisher``) buffers what its engine says and marks
itself ready here. One task takes a batch from every ready job and sends them all in one round
trip (``SessionPublisher.publish_many``: a pipeline of one script call per session), so a busy
worker pays one round trip per tick instead of one per job per window.

The tick adapts to load: the next flush starts no sooner than ``window`` after the last one
began, and the window grows with the jobs open on the worker (up to ``max_window_ms`` at
``saturate_jobs``): an idle worker publishes at once, a busy one coalesces many jobs' batches
into each round trip. Counting open jobs, not the jobs the last flush carried, matters when
each job says little (1 token/s): a window sized by the last flush would stay near zero and
every batch would pay a round trip of its own. Urgent batches (a job's end, a batch someone waits
for) go first and wait a quarter of the window at most; a job's first token goes at once (time to
first token is what users feel), taking whatever else is ready with it.
Up to ``in_flight`` flushes overlap (the next is packed while Redis runs the last), but a job
has at most one batch in flight, so its batches land in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from shared.logs import log
from shared.outage import ride_out
from shared.stream.publish import Batch, Published, SessionPublisher

logger = logging.getLogger("tokenbus.worker.batcher")

#: Of the window, what an urgent batch (a start, a first token, an end) may wait.
URGENT_SHARE = 0.25


class Source(Protocol):
    """What the batcher flushes: a job's publisher."""

    def take(self) -> Batch | None:
        """The batch to send now (None: nothing, or a batch of it is still in flight)."""

    def landed(self, batch: Batch, result: Published | BaseException) -> None:
        """``batch`` was applied (``Published``) or failed; called once per taken batch."""


class PublishBatcher:
    def __init__(
        self,
        sessions: SessionPublisher,
        *,
        max_window_ms: float,
        hold_s: float,
        saturate_jobs: int = 64,
        in_flight: int = 2,
    ) -> None:
        self._sessions = sessions
        self._max_window = max(max_window_ms, 0.0) / 1000.0
        self._hold_s = hold_s
        self._saturate = max(saturate_jobs, 1)
        # dicts as ordered sets: first come, first flushed
        self._ready: dict[Source, None] = {}
        self._urgent: dict[Source, None] = {}
        self._open: set[Source] = set()  # jobs publishing on this worker
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max(in_flight, 1))
        self._flights: set[asyncio.Task[None]] = set()
        self._closed = False
        self._last_start = 0.0
        self._at_once = False
        self.flushes = 0
        self.batches = 0

    @property
    def window(self) -> float:
        """Seconds between flush starts, at the worker's load now."""
        return self._max_window * min(1.0, len(self._open) / self._saturate)

    @property
    def urgent_window(self) -> float:
        """The most an urgent batch waits for others to join it, at the worker's load now."""
        return self.window * URGENT_SHARE

    def join(self, source: Source) -> None:
        """``source`` publishes on this worker until ``forget``: it counts towards the load."""
        self._open.add(source)

    def ready(self, source: Source, *, urgent: bool = False, at_once: bool = False) -> None:
        """``source`` has something to publish; ``urgent``: in the very next flush, which
        ``at_once`` starts now (a job's first token), whatever the window."""
        if self._closed:
            raise RuntimeError("the worker's publisher is closed")
        if urgent or at_once:
            self._urgent[source] = None
            self._at_once = self._at_once or at_once
            self._hurry.set()
        else:
            self._ready[source] = None
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="publish-batcher")

    def forget(self, source: Source) -> None:
        self._open.discard(source)
        self._ready.pop(source, None)
        self._urgent.pop(source, None)

    async def close(self) -> None:
        """Stop flushing; whoever still waits for a batch to land is told it never will."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        flights = list(self._flights)
        for flight in flights:
            flight.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        left = [*self._urgent, *self._ready]
        self._urgent.clear()
        self._ready.clear()
        for source in left:
            batch = source.take()
            if batch is not None:
                source.landed(batch, RuntimeError("the worker's publisher closed"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._ready and not self._urgent:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = 0.0 if self._at_once else self.window * (URGENT_SHARE if self._urgent else 1.0)
            delay = self._last_start + wait - loop.time()
            if delay > 0:
                self._hurry.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._hurry.wait()
                continue  # an urgent batch may have come: its shorter wait may be over
            # A free flight first, then the batches: what arrives while waiting goes in them.
            await self._slots.acquire()
            self._at_once = False
            sources = [*self._urgent, *(s for s in self._ready if s not in self._urgent)]
            self._urgent.clear()
            self._ready.clear()
            taken: list[tuple[Source, Batch]] = []
            for source in sources:
                batch = source.take()
                if batch is not None:
                    taken.append((source, batch))
            if not taken:
                self._slots.release()
                continue
            self._last_start = loop.time()
            # Flushes overlap (the next is packed while Redis runs this one) yet a job's own
            # batches never do: take() gives nothing for a job whose batch is still in flight.
            flight = asyncio.create_task(self._flush(taken))
            self._flights.add(flight)
            flight.add_done_callback(self._landed)

    def _landed(self, flight: asyncio.Task[None]) -> None:
        self._flights.discard(flight)
        self._slots.release()

    async def _flush(self, taken: list[tuple[Source, Batch]]) -> None:
        batches = [batch for _, batch in taken]
        self.flushes += 1
        self.batches += len(batches)
        results: list[Published | Exception]
        try:
            results = await ride_out(
                lambda: self._sessions.publish_many(batches), hold_s=self._hold_s
            )
        except asyncio.CancelledError:
            for source, batch in taken:
                source.landed(batch, RuntimeError("the worker's publisher closed"))
            raise
        except Exception as exc:  # Redis gone past hold_s, or a bug: every job hears of it
            log(logger, "publish_failed", logging.WARNING, batches=len(batches), error=str(exc))
            results = [exc] * len(batches)
        for (source, batch), result in zip(taken, results, strict=True):
            try:
                source.landed(batch, result)
            except Exception:  # one job's bookkeeping never stops the others' publishing
                logger.exception("publish result handler failed")
