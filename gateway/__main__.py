"""``python -m gateway``: serve the gateway with settings from the environment.

SIGTERM or SIGINT drains it (gateway.serve) and it exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.serve import serve
from shared import collector, logs
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    logs.setup(settings.log_level)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    logs.log(
        logging.getLogger("tokenbus.gateway"),
        "gateway_starting",
        host=settings.host,
        port=settings.port,
    )
    collector.tune()
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
