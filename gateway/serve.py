"""One gateway process: serve until SIGTERM or SIGINT, then drain and return (the exit is 0).

The drain, in this order:

1. The listener closes: new connections are refused, so load balancers' probes fail and every
   reconnect reaches another gateway (or this port's replacement, which can bind at once).
   A request that still comes on a connection opened before gets 503 ``draining`` with
   ``Retry-After`` (``/readyz``: 503 ``{"status": "draining"}``).
2. Every WebSocket is closed with CLOSE_DRAINING (1012); every SSE stream sends what it holds,
   a ``retry:`` hint and a ``draining`` notice, and ends. Their clients resume elsewhere from
   the last offset they saw, so these end at once rather than at the deadline.
3. OpenAI answers, which no client can resume, run until ``gateway_drain_s`` has passed since
   the signal; those still running then end with a ``draining`` error (an error chunk and
   ``[DONE]`` on a stream, a 503 otherwise) and their jobs are cancelled.
4. Once no request is left (or ``GRACE_S`` after the deadline) the app shuts down.

A second signal skips the rest of the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from gateway import ws
from gateway.app import create_app
from gateway.drain import DRAIN, Drain
from shared.logs import log
from shared.settings import Settings

logger = logging.getLogger("tokenbus.gateway")

#: After the deadline: time for the answers cut short to send their error; then anything still
#: running is cancelled (aiohttp's shutdown), so the process ends within drain_s + 2 * GRACE_S.
GRACE_S = 1.0


class _Signals:
    """SIGTERM and SIGINT, counted: the first starts the drain, a second hurries it."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.again = asyncio.Event()
        self.name = ""

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.first.is_set():
            self.again.set()
            return
        self.name = sig.name
        self.first.set()


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        access_log=None,
        # An SSE client that leaves is noticed at once, not at the next keep-alive.
        handler_cancellation=True,
        shutdown_timeout=GRACE_S,
    )
    signals = _Signals()
    signals.install()
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        await signals.first.wait()
        await drain(runner, settings.gateway_drain_s, signals)
    finally:
        await runner.cleanup()


async def drain(runner: web.AppRunner, drain_s: float, signals: _Signals) -> None:
    """Steps 1 to 3 of the module's sequence; returns when the app may shut down."""
    app = runner.app
    state = app[DRAIN]
    loop = asyncio.get_running_loop()
    started = loop.time()
    websockets = len(app[ws.SOCKETS])
    at_start = state.counts()
    state.start()
    for site in list(runner.sites):
        await site.stop()
    log(
        logger,
        "gateway_draining",
        signal=signals.name,
        drain_s=drain_s,
        websockets=websockets,
        **at_start,
    )
    closing = asyncio.create_task(ws.close_all(app))
    idle = await _until_idle(state, drain_s, signals.again)
    if not idle:
        state.pass_deadline()
        idle = await _until_idle(state, GRACE_S, signals.again)
    if not closing.done():  # a client that never answers the close frame
        closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    log(
        logger,
        "gateway_drained",
        seconds=round(loop.time() - started, 3),
        websockets_closed=websockets,
        sse_ended=state.streams_ended,
        openai_finished=at_start["openai"] - state.answers_cut,
        openai_cut=state.answers_cut,
        refused=state.refused,
        # Requests still running now are cancelled by the shutdown that follows.
        left=state.in_flight,
    )


async def _until_idle(state: Drain, timeout_s: float, again: asyncio.Event) -> bool:
    """Wait until no request is in flight, ``timeout_s`` passed or a second signal came."""
    idle = asyncio.create_task(state.wait_idle(timeout_s))
    hurry = asyncio.create_task(again.wait())
    await asyncio.wait((idle, hurry), return_when=asyncio.FIRST_COMPLETED)
    for task in (idle, hurry):
        task.cancel()
    return state.in_flight == 0
