"""Sessions that remember: earlier exchanges as context, trimmed oldest first, kept in Redis."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from shared.conversation import Conversations, Exchange
from shared.jobs import get_record
from shared.keys import Keys
from shared.protocol import ChatMessage, Job
from shared.settings import Settings
from tests.clients import answer_text, follow
from tests.conftest import TINY_MODEL, report
from tests.engine_thread import ThreadedEngine
from tests.servers import auth, new_session, stack
from workers.context import fit

SYNTHETIC_TOKENS = 24  # the settings fixture's answer length, in words


async def ask(
    ws: aiohttp.ClientWebSocketResponse, content: str, **fields: Any
) -> tuple[str, str, dict[str, Any]]:
    """Send one user turn; return its job id, answer text and terminal event."""
    await ws.send_json(
        {"type": "prompt", "messages": [{"role": "user", "content": content}], **fields}
    )
    events: list[dict[str, Any]] = []
    job_id = ""
    async with asyncio.timeout(60):
        while True:
            message = await ws.receive_json()
            if message["type"] == "queued":
                job_id = message["job_id"]
            elif message["type"] == "error" and "job_id" not in message:
                raise AssertionError(message)
            events.append(message)
            if message.get("job_id") == job_id and message["type"] in ("stream_end", "error"):
                return job_id, answer_text(events, job_id), message


async def messages(http: aiohttp.ClientSession, session: dict[str, Any]) -> list[dict[str, str]]:
    url = session["jobs_url"].removesuffix("/jobs") + "/messages"
    async with http.get(url, headers=auth(session)) as response:
        body = await response.json()
        assert response.status == 200, body
        result: list[dict[str, str]] = body["messages"]
        return result


def words(text: str) -> int:
    return len(text.split())


async def test_a_session_answers_with_its_history_and_stores_each_exchange(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, session["session_id"])
            _, first, end1 = await ask(ws, "one two three")
            _, second, end2 = await ask(ws, "four five")
            _, _, end3 = await ask(ws, "six", memory=False)
        stored = await messages(http, session)

    # The synthetic engine counts prompt words: the second prompt carried the first exchange.
    assert end1["usage"]["prompt_tokens"] == 3
    assert end2["usage"]["prompt_tokens"] == 3 + words(first) + 2
    assert end3["usage"]["prompt_tokens"] == 1  # memory off: no history, and not stored
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "one two three"),
        ("assistant", first),
        ("user", "four five"),
        ("assistant", second),
    ]
    ttl = await redis.ttl(keys.session_conversation(session["session_id"]))
    assert 0 < ttl <= settings.conversation_ttl_s


async def test_two_sessions_never_see_each_others_history(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        a, b = await new_session(http, base), await new_session(http, base)
        async with http.ws_connect(a["ws_url"]) as ws_a, http.ws_connect(b["ws_url"]) as ws_b:
            await follow(ws_a, a["session_id"])
            await follow(ws_b, b["session_id"])
            await ask(ws_a, "alpha secret words here")
            _, _, end_b = await ask(ws_b, "beta")
        stored_b = await messages(http, b)
        # B's token does not open A's conversation.
        url_a = a["jobs_url"].removesuffix("/jobs") + "/messages"
        async with http.get(url_a, headers=auth(b)) as refused:
            assert refused.status == 401
            assert (await refused.json())["error"]["code"] == "unauthorized"

    assert end_b["usage"]["prompt_tokens"] == 1
    assert [m["content"] for m in stored_b if m["role"] == "user"] == ["beta"]


async def test_a_cancelled_answer_is_remembered_as_far_as_it_went(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    slow = settings.model_copy(update={"synthetic_tokens_per_s": 40, "synthetic_tokens": 400})
    async with stack(slow) as (base, http):
        session = await new_session(http, base)
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, session["session_id"])
            await ws.send_json(
                {"type": "prompt", "messages": [{"role": "user", "content": "tell a story"}]}
            )
            events: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while sum(e["type"] == "delta" for e in events) < 3:
                    events.append(await ws.receive_json())
                job_id = next(e["job_id"] for e in events if e["type"] == "queued")
                await ws.send_json({"type": "cancel", "job_id": job_id})
                while events[-1]["type"] != "stream_end":
                    events.append(await ws.receive_json())
        stored = await messages(http, session)

    assert events[-1]["finish_reason"] == "cancelled"
    said = answer_text(events, job_id)
    assert said and words(said) < 400
    assert stored == [
        {"role": "user", "content": "tell a story", "job_id": job_id},
        {"role": "assistant", "content": said, "job_id": job_id},
    ]
    assert (await get_record(redis, keys, job_id))["state"] == "cancelled"


async def test_history_is_trimmed_oldest_first_to_the_context(settings: Settings) -> None:
    # A 100-word context; max_tokens 30 keeps 30 free, so a prompt may take 70 words.
    small = settings.model_copy(update={"max_model_len": 100})
    prompt = " ".join(["word"] * 10)
    async with stack(small) as (base, http):
        session = await new_session(http, base)
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, session["session_id"])
            ends = [(await ask(ws, prompt, max_tokens=30))[2] for _ in range(3)]
        stored = await messages(http, session)

    exchange = 10 + SYNTHETIC_TOKENS  # 34 words
    # Third: two earlier exchanges and its own 10 words (78) do not fit; the oldest went.
    assert [e["usage"]["prompt_tokens"] for e in ends] == [10, exchange + 10, exchange + 10]
    assert len(stored) == 6  # trimming the context never forgets what was said


async def test_the_conversation_keeps_only_the_latest_exchanges(settings: Settings) -> None:
    few = settings.model_copy(update={"conversation_max_exchanges": 2})
    async with stack(few) as (base, http):
        session = await new_session(http, base)
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, session["session_id"])
            for n in ("first", "second", "third"):
                await ask(ws, n)
        stored = await messages(http, session)
        async with http.delete(
            session["jobs_url"].removesuffix("/jobs") + "/messages", headers=auth(session)
        ) as response:
            assert response.status == 200
        assert await messages(http, session) == []

    assert [m["content"] for m in stored if m["role"] == "user"] == ["second", "third"]


async def test_remembering_an_exchange_twice_keeps_one(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    conversations = Conversations(redis, keys, max_exchanges=10, ttl_s=60)
    exchange = Exchange(
        job_id='job-"quoted"-é',
        messages=(ChatMessage(role="user", content="hi"),),
        answer="hello",
        finish_reason="stop",
    )
    assert await conversations.remember("s-dup", exchange) is True
    assert await conversations.remember("s-dup", exchange) is False  # a redelivered job
    other = exchange.model_copy(update={"job_id": "job-2"})
    assert await conversations.remember("s-dup", other) is True
    assert [e.job_id for e in await conversations.load("s-dup")] == [exchange.job_id, "job-2"]
    # A corrupt entry is skipped, not fatal to the rest.
    await redis.rpush(keys.session_conversation("s-dup"), "{not json")
    assert len(await conversations.load("s-dup")) == 2


def _exchange(n: int, size: int) -> Exchange:
    return Exchange(
        job_id=f"j{n}",
        messages=(ChatMessage(role="user", content=" ".join([f"u{n}"] * size)),),
        answer=" ".join([f"a{n}"] * size),
        finish_reason="stop",
    )


def _words(messages: list[ChatMessage]) -> list[str]:
    return [w for m in messages for w in m.content.split()]


@pytest.mark.parametrize(
    ("budget", "kept"), [(100, 4), (43, 4), (42, 3), (23, 2), (22, 1), (12, 0), (1, 0)]
)
def test_fit_keeps_the_latest_whole_exchanges_that_fit(budget: int, kept: int) -> None:
    history = [_exchange(n, 5) for n in range(4)]  # 10 words each; the job's own 3
    job = Job(session_id="s", messages=[ChatMessage(role="user", content="q q q")])
    fitted = fit(job, history, _words, budget)
    assert (fitted.kept, fitted.dropped) == (kept, 4 - kept)
    expected = [w for e in history[4 - kept :] for w in _words(e.turns())] + ["q"] * 3
    assert fitted.prompt == expected


async def test_vllm_trims_history_to_the_models_context(
    settings: Settings, tiny_engine: ThreadedEngine
) -> None:
    """A real tokenizer and chat template: the prompt never outgrows the 512-token context."""
    tiny = settings.model_copy(update={"model": TINY_MODEL, "default_model": TINY_MODEL})
    context = tiny_engine.inner.max_model_len
    long_turn = " ".join(f"fact {n} is remembered" for n in range(6))
    prompt_tokens: list[int] = []
    async with stack(tiny, tiny_engine) as (base, http):
        session = await new_session(http, base)
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, session["session_id"])
            for _ in range(8):
                _, _, end = await ask(ws, long_turn, max_tokens=16, temperature=0)
                assert end["type"] == "stream_end", end
                prompt_tokens.append(end["usage"]["prompt_tokens"])
        stored = await messages(http, session)

    report(f"tiny vLLM, 8 turns on one session: prompt tokens {prompt_tokens} (context {context})")
    assert len(stored) == 16
    # Grows while the history fits, drops when the oldest exchange is left out, and never
    # leaves less than the answer's room.
    assert prompt_tokens[1] > prompt_tokens[0]
    assert any(later < earlier for earlier, later in itertools.pairwise(prompt_tokens))
    assert max(prompt_tokens) <= context - 16
