"""What a gateway does while it drains (SIGTERM): refuse new work, end what it can resume elsewhere.

A draining gateway no longer takes work (``drain_guard`` answers 503 ``draining``), ends every
SSE stream at once (they resume on another gateway from ``Last-Event-ID``), and lets OpenAI
answers, which cannot resume, run until the deadline; those still running then end with a
``draining`` error. gateway.serve runs the whole sequence; this module holds its state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import ApiError
from gateway.outbox import Outbox

#: Why an outbox was closed by the drain (the SSE and OpenAI handlers tell their clients).
DRAINING = "draining"
#: What a refused request is told to wait before it retries (another gateway answers sooner).
RETRY_AFTER_S = 1
#: The ``retry:`` an ending SSE stream sends: EventSource comes back soon, to whichever gateway
#: the address leads to now, but not in a tight loop while this one's port refuses connections.
SSE_RETRY_MS = 250

#: Handlers that answer while draining (health, readiness, metrics, SSE's own ending).
_DRAIN_AWARE: set[Any] = set()


def drain_aware(handler: Handler) -> Handler:
    """Mark a route handler as one that answers while draining (drain_guard lets it through)."""
    _DRAIN_AWARE.add(handler)
    return handler


def draining_error() -> ApiError:
    return ApiError(
        503, DRAINING, "this gateway is shutting down; retry (another gateway will answer)"
    )


class Drain:
    """One gateway's drain: whether it started, and the streams it ends."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.deadline_passed = False
        self.refused = 0
        self.streams_ended = 0
        self.answers_cut = 0
        self._streams: set[Outbox] = set()  # SSE: ended when the drain starts
        self._answers: set[Outbox] = set()  # OpenAI: ended when the deadline passes
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    @property
    def in_flight(self) -> int:
        """Requests being handled now (open WebSockets and streams included)."""
        return self._in_flight

    def counts(self) -> dict[str, int]:
        return {
            "in_flight": self._in_flight,
            "sse": len(self._streams),
            "openai": len(self._answers),
        }

    def start(self) -> None:
        """Refuse new work from now on and end every SSE stream (idempotent)."""
        if self.started_at is None:
            self.started_at = asyncio.get_running_loop().time()
        for outbox in list(self._streams):
            self._end(outbox)

    def pass_deadline(self) -> None:
        """End the OpenAI answers still running: their clients get a ``draining`` error."""
        self.start()
        self.deadline_passed = True
        for outbox in list(self._answers):
            if outbox.closed is None:
                self.answers_cut += 1
            outbox.close(DRAINING)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, at most ``timeout_s``; whether none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        return self._in_flight == 0

    def add_stream(self, outbox: Outbox) -> None:
        """Close ``outbox`` (an SSE stream's) with DRAINING when the drain starts, or now."""
        self._streams.add(outbox)
        if self.draining:
            self._end(outbox)

    def add_answer(self, outbox: Outbox) -> None:
        """Close ``outbox`` (an OpenAI answer's) with DRAINING when the deadline passes, or now."""
        self._answers.add(outbox)
        if self.deadline_passed:
            outbox.close(DRAINING)

    def discard(self, outbox: Outbox) -> None:
        self._streams.discard(outbox)
        self._answers.discard(outbox)

    def _end(self, outbox: Outbox) -> None:
        if outbox.closed is None:
            self.streams_ended += 1
        outbox.close(DRAINING)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one request in flight while inside."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


DRAIN = web.AppKey("drain", Drain)


@web.middleware
async def drain_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count requests in flight; while draining, refuse new ones with 503 ``draining``.

    Only requests on connections opened before the drain get here (the listener is closed):
    the refusal tells them, and whatever proxy sent them, to go to another gateway.
    """
    drain = request.app[DRAIN]
    if drain.draining and request.match_info.handler not in _DRAIN_AWARE:
        drain.refused += 1
        response = draining_error().response({"Retry-After": str(RETRY_AFTER_S)})
        response.force_close()
        return response
    with drain.track():
        return await handler(request)


async def end_on_shutdown(app: web.Application) -> None:
    """An app shut down without a drain first (tests, an embedding runner) ends its streams now
    rather than after the runner's grace period."""
    app[DRAIN].pass_deadline()
