"""An engine whose (simulated) process dies mid-answer: what a worker crash looks like to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from shared.conversation import Exchange
from shared.protocol import Job
from workers.engine import Engine, EngineDead, EngineDelta


class DiesAfter:
    """``engine``, except that every answer raises EngineDead after ``n`` deltas."""

    def __init__(self, engine: Engine, n: int) -> None:
        self.inner = engine
        self.name = engine.name
        self.token_space = engine.token_space
        self._n = n

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def abort(self, job_id: str) -> None:
        await self.inner.abort(job_id)

    async def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        n = 0
        # Closed at once on death, as a dead process's requests end with it: an abandoned
        # stream would keep generating until garbage collection closed it.
        inner = self.inner.generate(job, prefix=prefix, prefix_ids=prefix_ids, history=history)
        try:
            async for delta in inner:
                if n == self._n:
                    raise EngineDead("the engine process exited")
                n += 1
                yield delta
        finally:
            aclose = getattr(inner, "aclose", None)  # as the worker closes an engine's stream
            if aclose is not None:
                await aclose()
