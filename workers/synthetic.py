"""The ``synthetic`` engine: deterministic text at a set pace, the load generator for benchmarks.

The answer is a function of the job alone (``synthetic_text``), so tests and benchmarks know
what a client must receive, and a later attempt can continue an answer from any token boundary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from shared.conversation import Exchange
from shared.protocol import ChatMessage, FinishReason, Job, Usage
from shared.settings import Settings
from shared.synthetic import WORDS, synthetic_text, token_id
from workers.context import fit, history_budget, wanted_tokens
from workers.engine import EngineDelta, EngineError

#: The context it pretends to have when max_model_len is 0, in words.
CONTEXT_WORDS = 8192

__all__ = ["WORDS", "SyntheticEngine", "answer_length", "synthetic_text", "token_id"]


def answer_length(job: Job, settings: Settings) -> tuple[int, FinishReason]:
    """Tokens the engine generates for ``job`` in all, and why it stops there."""
    limit = wanted_tokens(job, settings.default_max_tokens)
    if limit < settings.synthetic_tokens:
        return limit, "length"
    return settings.synthetic_tokens, "stop"


def _words(messages: list[ChatMessage]) -> list[str]:
    return [word for m in messages for word in m.content.split()]


def prompt_tokens(job: Job, history: Sequence[Exchange], settings: Settings) -> int:
    """Words in the prompt; for a chat job, with the history that fits its context in front.

    History changes the count only, never the answer text, so tests can still predict it.
    """
    if job.prompt is not None:
        return len(job.prompt.split())
    context = settings.max_model_len or CONTEXT_WORDS
    budget = history_budget(job, context, settings.default_max_tokens)
    return len(fit(job, history, _words, budget).prompt)


def _tokens_in_prefix(tokens: list[str], prefix: str) -> int:
    """How many whole tokens ``prefix`` is; EngineError when it is not a start of the answer."""
    if not prefix:
        return 0
    end = 0
    for i, token in enumerate(tokens):
        end += len(token)
        if end == len(prefix):
            if "".join(tokens[: i + 1]) == prefix:
                return i + 1
            break
        if end > len(prefix):
            break
    raise EngineError(
        "bad_prefix", "text already published is not a token-aligned start of this answer"
    )


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


class SyntheticEngine:
    name: str = "synthetic"
    token_space: str = "synthetic:words-v1"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ttft = max(settings.synthetic_ttft_ms, 0.0) / 1000.0
        tps = settings.synthetic_tokens_per_s
        self._interval = 1.0 / tps if tps > 0 else 0.0
        self._aborts: dict[str, _Abort] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for aborted in self._aborts.values():
            aborted.set()

    async def abort(self, job_id: str) -> None:
        aborted = self._aborts.get(job_id)
        if aborted is not None:
            aborted.set()

    async def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        total, finish = answer_length(job, self._settings)
        tokens = synthetic_text(job, total)
        if prefix_ids is not None and (prefix_ids or not prefix):
            done = len(prefix_ids)
            if done > total or [token_id(t) for t in tokens[:done]] != list(prefix_ids):
                raise EngineError("bad_prefix", "published token ids are not this answer's")
        else:
            done = _tokens_in_prefix(tokens, prefix)
        n_prompt = prompt_tokens(job, history, self._settings)
        if job.id in self._aborts:
            raise EngineError("duplicate_job", f"job {job.id} is already running")
        aborted = _Abort()
        self._aborts[job.id] = aborted
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            if done == total:  # an earlier attempt published the whole answer
                yield EngineDelta("", 0, time.time(), finish, _usage(n_prompt, total))
                return
            for i in range(done, total):
                # Absolute schedule: a late wake-up never delays the tokens after it.
                due = start + self._ttft + (i - done) * self._interval
                if await _sleep_until(aborted, due, loop):
                    yield EngineDelta("", 0, time.time(), "cancelled", _usage(n_prompt, i))
                    return
                ids = (token_id(tokens[i]),)
                if i == total - 1:
                    usage = _usage(n_prompt, total)
                    yield EngineDelta(tokens[i], 1, time.time(), finish, usage, token_ids=ids)
                else:
                    yield EngineDelta(tokens[i], 1, time.time(), token_ids=ids)
        finally:
            if self._aborts.get(job.id) is aborted:
                del self._aborts[job.id]


class _Abort:
    """A job's abort flag, and the sleep it cuts short.

    Not an ``asyncio.Event`` under ``asyncio.timeout_at``: that costs a Timeout, a timer and a
    waiter task bookkeeping per token, and the engine sleeps once per token of every answer
    (12,000 times a second at 600 answers x 20 tokens/s): a future and one timer handle do.
    """

    __slots__ = ("flag", "waiter")

    def __init__(self) -> None:
        self.flag = False
        self.waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        self.flag = True
        _wake(self.waiter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _sleep_until(aborted: _Abort, due: float, loop: asyncio.AbstractEventLoop) -> bool:
    """Sleep until loop time ``due`` or an abort, whichever comes first; True when aborted."""
    if due <= loop.time():
        await asyncio.sleep(0)  # behind schedule: still let other jobs run
    elif not aborted.flag:
        waiter: asyncio.Future[None] = loop.create_future()
        aborted.waiter = waiter
        timer = loop.call_at(due, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            aborted.waiter = None
    return aborted.flag
