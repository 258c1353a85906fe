"""What the fuzz tests share: a gateway and a worker on a loop of their own, and a log watch.

Hypothesis runs plain (synchronous) test functions, so the stack under test runs in a thread
with its own event loop, on real sockets; each example sends its input from the test's thread
(``BackgroundStack.run`` for aiohttp coroutines, or a blocking client such as requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from shared.settings import Settings
from tests.servers import new_session, running_gateway, running_worker

T = TypeVar("T")


#: Generating big or deep inputs is slow by design here; that is not a problem to report.
FUZZ_HEALTH_CHECKS = (HealthCheck.too_slow, HealthCheck.data_too_large)


def fuzz_settings(max_examples: int) -> hypothesis_settings:
    """Every fuzz target's: a fixed example count, the same examples on every run (CI stays
    stable), no per-example deadline (2 shared cores make timings noisy), no database on disk.
    """
    return hypothesis_settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=FUZZ_HEALTH_CHECKS,
        print_blob=True,
    )


class ServerErrors(logging.Handler):
    """Collects what the processes under test log at ERROR or above (tracebacks included).

    aiohttp logs "Error handling request" for every exception a handler let out (the 500s
    and the dropped connections), and asyncio logs tasks that died unobserved: the fuzz
    asserts there are none.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.refused = 0

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        # aiohttp's HTTP parser refusing a malformed message (a truncated deflate body): it
        # answers 400 itself and logs it, before any of our code runs. A client error.
        if isinstance(exc, HttpProcessingError) and exc.code == 400:
            self.refused += 1
            return
        self.records.append(record)

    def summary(self) -> list[str]:
        return [
            f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
            for r in self.records
        ]


@contextlib.contextmanager
def watch_errors() -> Iterator[ServerErrors]:
    handler = ServerErrors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class BackgroundStack:
    """A worker and a gateway served from another thread's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-stack")
        self._stack = contextlib.AsyncExitStack()
        self.base = ""
        self.http: aiohttp.ClientSession | None = None
        self.session: dict[str, Any] = {}

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the stack's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        await self._stack.enter_async_context(running_worker(self.settings))
        self.base = await self._stack.enter_async_context(running_gateway(self.settings))
        self.http = await self._stack.enter_async_context(aiohttp.ClientSession())
        self.session = await new_session(self.http, self.base)

    def __enter__(self) -> BackgroundStack:
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()

    def client(self) -> aiohttp.ClientSession:
        assert self.http is not None, "used outside 'with'"
        return self.http

    def alive(self) -> bool:
        """The gateway still answers (its health route) and its loop still runs."""

        async def probe() -> bool:
            async with self.client().get(f"{self.base}/healthz") as response:
                return response.status == 200

        return self._thread.is_alive() and self.run(probe(), timeout=10)
