"""``python -m workers``: one worker process, configured from ``TOKENBUS_*`` variables."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from prometheus_client import start_http_server

from shared import collector
from shared.logs import log, setup
from shared.settings import Settings
from workers.consumer import Worker
from workers.models import ModelError

logger = logging.getLogger("tokenbus.worker")


async def serve(settings: Settings) -> None:
    """Run a worker until SIGINT or SIGTERM, then let it drain and return."""
    worker = Worker(settings)
    server = None
    if settings.metrics_port:
        # Served from a thread of its own: a scrape never waits on the event loop.
        server, _ = start_http_server(settings.metrics_port, registry=worker.metrics.registry)
        log(logger, "metrics_serving", port=settings.metrics_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.request_stop)
    try:
        await worker.run()
        if worker.failure is not None:
            sys.exit(1)  # for the supervisor to restart it
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main() -> None:
    settings = Settings()
    setup(settings.log_level)
    collector.tune()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            runner.run(serve(settings))
        except ModelError as exc:  # a configuration problem: say it in one line, no traceback
            log(logger, "engine_failed", logging.ERROR, error=str(exc))
            sys.exit(2)


if __name__ == "__main__":
    main()
