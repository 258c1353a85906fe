"""One vLLM engine for the whole test session, shared by tests that each run their own loop.

vLLM's AsyncLLM binds its output handler to the event loop that first uses it, and every
pytest-asyncio test has a loop of its own. So the engine lives on a loop in a thread of its
own, and ``ThreadedEngine`` hands each call and each streamed delta across.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

from shared.conversation import Exchange
from shared.protocol import Job
from workers.engine import EngineDelta
from workers.vllm_engine import VllmEngine

T = TypeVar("T")


class ThreadedEngine:
    """The Engine protocol, run on the engine thread's loop; close() leaves the engine running."""

    name: str = "vllm"

    def __init__(self, inner: VllmEngine) -> None:
        self.inner = inner
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600.0) -> T:
        """Run ``coro`` on the engine loop from plain (non-async) code."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine loop from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def unfinished_requests(self) -> int:
        async def count() -> int:
            return self.inner.unfinished_requests()

        return await self.call(count())

    def shutdown(self) -> None:
        self.run(self.inner.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    # The Engine protocol, as a worker sees it

    @property
    def token_space(self) -> str:
        return self.inner.token_space

    async def start(self) -> None:
        return None  # started once, by the session fixture

    async def close(self) -> None:
        return None  # shared: the session fixture shuts it down

    async def abort(self, job_id: str) -> None:
        await self.call(self.inner.abort(job_id))

    async def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        here = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, item: Any) -> None:
            if not here.is_closed():
                here.call_soon_threadsafe(queue.put_nowait, (kind, item))

        async def pump() -> None:
            try:
                deltas = self.inner.generate(
                    job, prefix=prefix, prefix_ids=prefix_ids, history=history
                )
                async for delta in deltas:
                    put("delta", delta)
                put("end", None)
            except Exception as exc:
                put("error", exc)
            except BaseException as exc:
                # However the pump ends, its reader must hear of it, or it waits forever.
                put("error", RuntimeError(f"the engine's stream was cancelled: {exc!r}"))
                raise

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                kind, item = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            future.cancel()  # an abandoned stream closes the engine's generator: vLLM aborts
