"""``python -m gateway``: serve the gateway with settings from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from gateway.app import create_app
from shared import logs
from shared.settings import Settings


def main() -> None:
    logs.setup()
    settings = Settings()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    logs.log(
        logging.getLogger("tokenbus.gateway"),
        "gateway_starting",
        host=settings.host,
        port=settings.port,
    )
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
        # An SSE client that leaves is noticed at once, not at the next keep-alive.
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
