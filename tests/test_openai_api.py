"""The OpenAI-compatible routes, through the official ``openai`` client on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from redis.asyncio import Redis

from shared.conversation import Exchange
from shared.jobs import get_record
from shared.keys import Keys
from shared.protocol import ChatMessage, Job, SamplingParams
from shared.settings import Settings
from tests.servers import auth, running_gateway, running_worker, stack
from workers.engine import EngineDelta, EngineError
from workers.synthetic import SyntheticEngine, synthetic_text

SEED = 7
CHAT_KEYS = {"id", "object", "created", "model", "system_fingerprint", "choices"}


def client(base: str, api_key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)


@contextlib.asynccontextmanager
async def openai_stack(
    settings: Settings, engine: Any = None
) -> AsyncIterator[tuple[str, aiohttp.ClientSession, AsyncOpenAI]]:
    async with stack(settings, engine) as (base, http):
        api = client(base)
        try:
            yield base, http, api
        finally:
            await api.close()


def expected(settings: Settings, n: int, *, prompt: str | None = None, **chat: str) -> str:
    """What the synthetic engine answers a seeded job (its text depends on seed and prompt)."""
    messages = [ChatMessage.model_validate({"role": r, "content": c}) for r, c in chat.items()]
    job = Job(
        session_id="any",
        model=settings.model,
        prompt=prompt,
        messages=None if prompt is not None else messages,
        sampling=SamplingParams(seed=SEED),
    )
    return "".join(synthetic_text(job, n))


def data_lines(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, asserting it holds nothing else."""
    events = body.decode().split("\n\n")
    assert events[-1] == "", "the body ends with a complete event"
    payloads = []
    for event in events[:-1]:
        if event == ": keep-alive":
            continue
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event.removeprefix("data: "))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads[:-1]


async def test_models_lists_what_live_workers_serve(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    # A model whose worker stopped beating long ago is not listed.
    await redis.zadd(keys.models, {"gone": time.time() - 3600})
    async with running_worker(settings), running_gateway(settings) as base:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == [settings.model]
        assert models.data[0].owned_by == "tokenbus" and models.data[0].object == "model"
        one = await client.models.retrieve(settings.model)
        assert one.id == settings.model
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("gone")
        assert caught.value.status_code == 404
        body = caught.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found"
        await client.close()


async def test_chat_streamed_and_whole_give_the_engines_answer(settings: Settings) -> None:
    # "developer" is the system role by its newer name: the engine sees "system".
    messages: Any = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
        },
    ]
    async with openai_stack(settings) as (_, _, api):
        # Text parts join with a newline, so send the same prompt as one string for the stream.
        messages_flat: Any = [messages[0], {"role": "user", "content": "Hi\nthere"}]
        whole = await api.chat.completions.create(
            model="synthetic", messages=messages, seed=SEED, user="someone"
        )
        chunks = [
            c
            async for c in await api.chat.completions.create(
                model="synthetic", messages=messages_flat, seed=SEED, stream=True
            )
        ]
    want = expected(settings, settings.synthetic_tokens, system="Be brief.", user="Hi\nthere")
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "synthetic"
    assert whole.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason == "stop"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == settings.synthetic_tokens
    assert whole.usage.prompt_tokens == 4  # words: "Be brief." and "Hi\nthere"
    assert whole.usage.total_tokens == 4 + settings.synthetic_tokens

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "stop"]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id != whole.id
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)


async def test_include_usage_adds_a_last_chunk_with_usage_only(settings: Settings) -> None:
    async with openai_stack(settings) as (_, _, api):
        chunks = [
            c
            async for c in await api.chat.completions.create(
                model="synthetic",
                messages=[{"role": "user", "content": "count words"}],
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
    *answer, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 5)
    assert all(c.usage is None and len(c.choices) == 1 for c in answer)
    assert answer[-1].choices[0].finish_reason == "length"  # max_tokens < the engine's 24


async def test_completions_default_to_16_tokens_streamed_or_not(settings: Settings) -> None:
    want = expected(settings, 16, prompt="Once upon a time")
    async with openai_stack(settings) as (_, _, api):
        whole = await api.completions.create(
            model="synthetic", prompt="Once upon a time", seed=SEED
        )
        chunks = [
            c
            async for c in await api.completions.create(
                model="synthetic", prompt=["Once upon a time"], seed=SEED, stream=True
            )
        ]
        longer = await api.completions.create(
            model="synthetic", prompt="Once upon a time", seed=SEED, max_tokens=100
        )
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 16
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "text_completion" for c in chunks)
    assert longer.choices[0].text == expected(settings, 24, prompt="Once upon a time")
    assert longer.choices[0].finish_reason == "stop"


async def test_raw_sse_framing_is_openais(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        body = {
            "model": "synthetic",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.post(f"{base}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert response.headers["X-Accel-Buffering"] == "no"
            job_id = response.headers["X-Tokenbus-Job-Id"]
            assert response.headers["X-Tokenbus-Session-Id"].startswith("s_")
            chat = [json.loads(p) for p in data_lines(await response.read())]
        text_body = {"model": "synthetic", "prompt": "hello", "max_tokens": 2, "stream": True}
        async with http.post(f"{base}/v1/completions", json=text_body) as response:
            assert response.status == 200
            text = [json.loads(p) for p in data_lines(await response.read())]

    assert all(set(c) == CHAT_KEYS | {"usage"} for c in chat)
    assert {(c["id"], c["object"], c["model"], c["created"]) for c in chat} == {
        ("chatcmpl-" + job_id.removeprefix("job_"), "chat.completion.chunk", "synthetic",
         chat[0]["created"])
    }  # fmt: skip
    assert all(c["system_fingerprint"] is None for c in chat)
    choices = [c["choices"] for c in chat]
    assert choices[0] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}
    ]  # fmt: skip
    for middle in choices[1:-2]:
        assert middle == [
            {"index": 0, "delta": {"content": middle[0]["delta"]["content"]}, "logprobs": None,
             "finish_reason": None}
        ]  # fmt: skip
    # The worker may batch tokens into fewer deltas: count the words, not the chunks.
    assert len("".join(m[0]["delta"]["content"] for m in choices[1:-2]).split()) == 3
    assert choices[-2] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert choices[-1] == [] and chat[-1]["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 3,
        "total_tokens": 4,
    }
    assert all(c["usage"] is None for c in chat[:-1])

    # Completions: no opening chunk, no usage key unless asked for.
    assert all(set(c) == CHAT_KEYS and c["object"] == "text_completion" for c in text)
    assert all(c["id"].startswith("cmpl-") for c in text)
    assert [c["choices"][0]["finish_reason"] for c in text[:-1]] == [None] * (len(text) - 1)
    assert len("".join(c["choices"][0]["text"] for c in text).split()) == 2
    assert text[-1]["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    ]
    assert all(set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} for c in text)


async def test_refusals_name_the_parameter(settings: Settings) -> None:
    chat: Any = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
    text: Any = {"model": "synthetic", "prompt": "hi"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("chat", {"n": 2}, "n"),
        ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("chat", {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ("chat", {"logprobs": True}, "logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"logit_bias": {"50256": -100}}, "logit_bias"),
        ("chat", {"temperature": 3}, "temperature"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.type",
        ),
        ("text", {"n": 3}, "n"),
        ("text", {"echo": True}, "echo"),
        ("text", {"suffix": "end"}, "suffix"),
        ("text", {"best_of": 2}, "best_of"),
        ("text", {"logprobs": 1}, "logprobs"),
        ("text", {"prompt": [1, 2, 3]}, "prompt"),
        ("text", {"prompt": ["a", "b"]}, "prompt"),
    ]
    # Refused before any job exists: no worker needed.
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        for route, extra, param in cases:
            path = "chat/completions" if route == "chat" else "completions"
            body = (chat if route == "chat" else text) | extra
            async with http.post(f"{base}/v1/{path}", json=body) as response:
                reply = await response.json()
                assert response.status == 400, (extra, reply)
                error = reply["error"]
                assert set(error) == {"message", "type", "code", "param"}
                assert (error["param"], error["type"]) == (param, "invalid_request_error"), extra
                assert error["message"]
        async with http.post(
            f"{base}/v1/chat/completions", data=b"{not json", headers={"Content-Type": "x"}
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "bad_json"
        huge = chat | {"messages": [{"role": "user", "content": "x" * settings.max_message_bytes}]}
        async with http.post(f"{base}/v1/chat/completions", json=huge) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "request_too_large"

    async with running_gateway(settings) as base:
        api = client(base)
        with pytest.raises(openai.BadRequestError) as caught:
            await api.chat.completions.create(model="synthetic", messages=chat["messages"], n=2)
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"
        await api.close()


async def test_unknown_model_overload_and_dead_model(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    async with openai_stack(settings) as (_, _, api):
        with pytest.raises(openai.NotFoundError) as not_found:
            await api.chat.completions.create(model="no-such-model", messages=messages)
        assert isinstance(not_found.value.body, dict)
        assert not_found.value.body["code"] == "model_not_found"
        await redis.zadd(keys.models, {"stale": time.time() - 3600})
        with pytest.raises(openai.InternalServerError) as dead:
            await api.completions.create(model="stale", prompt="hi")
        assert dead.value.status_code == 503
        assert isinstance(dead.value.body, dict) and dead.value.body["code"] == "no_worker"

    full = settings.model_copy(update={"max_queue_depth": 0})
    async with openai_stack(full) as (_, _, api):
        with pytest.raises(openai.RateLimitError) as overloaded:
            await api.chat.completions.create(model="synthetic", messages=messages, stream=True)
        assert isinstance(overloaded.value.body, dict)
        assert overloaded.value.body["code"] == "overloaded"


async def test_api_keys_guard_openai_routes_and_session_creation(settings: Settings) -> None:
    locked = settings.model_copy(update={"api_keys": "key-one, key-two"})
    messages: Any = [{"role": "user", "content": "hi"}]
    async with stack(locked) as (base, http):
        for key in ("wrong", "key-one,key-two", "KEY-ONE"):
            api = client(base, key)
            with pytest.raises(openai.AuthenticationError) as caught:
                await api.chat.completions.create(model="synthetic", messages=messages)
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await api.models.list()
            with pytest.raises(openai.AuthenticationError):
                await api.completions.create(model="synthetic", prompt="hi")
            await api.close()
        api = client(base, "key-two")
        answer = await api.chat.completions.create(model="synthetic", messages=messages)
        assert answer.choices[0].message.content
        assert [m.id for m in (await api.models.list()).data] == ["synthetic"]
        await api.close()

        for path in ("sessions", "chat/completions", "completions"):  # no Authorization
            async with http.post(f"{base}/v1/{path}", json={"prompt": "hi"}) as response:
                assert response.status == 401
                error = (await response.json())["error"]
                assert (error["code"], error["type"]) == ("invalid_api_key", "authentication_error")
        headers = {"Authorization": "Bearer key-one"}
        async with http.post(f"{base}/v1/sessions", headers=headers) as response:
            assert response.status == 201
            session = await response.json()
        # Session-scoped routes keep using the session token.
        async with http.post(
            session["jobs_url"],
            json={"prompt": "hi"},
            headers=auth(session),
        ) as response:
            assert response.status == 202


async def _wait_state(redis: Redis, keys: Keys, job_id: str, state: str) -> dict[str, str]:
    record: dict[str, str] = {}
    for _ in range(400):
        record = await get_record(redis, keys, job_id)
        if record.get("state") == state:
            break
        await asyncio.sleep(0.05)
    return record


async def test_disconnect_cancels_the_job(settings: Settings, redis: Redis, keys: Keys) -> None:
    slow = settings.model_copy(update={"synthetic_tokens_per_s": 20, "synthetic_tokens": 400})
    body = {"messages": [{"role": "user", "content": "long story"}], "stream": True}
    async with stack(slow) as (base, http):
        response = await http.post(f"{base}/v1/chat/completions", json=body)
        assert response.status == 200
        job_id = response.headers["X-Tokenbus-Job-Id"]
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"data: ")
            if seen == 3:  # the opening chunk and two of text
                break
        response.close()
        record = await _wait_state(redis, keys, job_id, "cancelled")
        assert record.get("state") == "cancelled"
        assert record.get("cancel_requested") == "disconnect"

        # A non-streaming request that is abandoned cancels its job too.
        async def complete() -> None:
            body = {"prompt": "x", "max_tokens": 300}
            async with http.post(f"{base}/v1/completions", json=body) as response:
                await response.read()

        task = asyncio.create_task(complete())
        running: list[str] = []
        for _ in range(400):
            async for key in redis.scan_iter(match=keys.job("*")):
                found = (await redis.hget(key, "state"), key.decode().rsplit(":", 1)[-1])
                if found[0] == b"running" and found[1] != job_id:
                    running.append(found[1])
            if running:
                break
            await asyncio.sleep(0.05)
        assert running, "the completion's job started"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = await _wait_state(redis, keys, running[0], "cancelled")
        assert record.get("state") == "cancelled"


class FailingEngine(SyntheticEngine):
    """The synthetic engine, but the job fails with ``code`` after ``after`` tokens."""

    def __init__(self, settings: Settings, code: str, after: int) -> None:
        super().__init__(settings)
        self.code, self.after = code, after

    async def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        deltas = super().generate(job, prefix=prefix, prefix_ids=prefix_ids)
        for _ in range(self.after):
            yield await anext(deltas)
        await self.abort(job.id)  # the synthetic answer ends: drain it so it cleans up
        async for _ in deltas:
            pass
        raise EngineError(self.code, f"failed with {self.code}")


async def test_worker_errors_map_to_statuses_or_an_error_chunk(settings: Settings) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    early = FailingEngine(settings, "context_length_exceeded", after=0)
    async with openai_stack(settings, early) as (_, _, api):
        # Before any output: a real HTTP status, streaming or not.
        with pytest.raises(openai.BadRequestError) as caught:
            await api.chat.completions.create(model="synthetic", messages=messages)
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model="synthetic", messages=messages, stream=True)

    late = FailingEngine(settings, "engine_error", after=3)
    async with openai_stack(settings, late) as (_, _, api):
        with pytest.raises(openai.InternalServerError) as failed:
            await api.completions.create(model="synthetic", prompt="hi")
        assert failed.value.status_code == 500
        # After output: an error chunk, which the client raises on, then [DONE].
        got: list[str] = []
        with pytest.raises(openai.APIError) as mid:
            async for chunk in await api.chat.completions.create(
                model="synthetic", messages=messages, stream=True
            ):
                got.append(chunk.choices[0].delta.content or "")
        assert len("".join(got).split()) == 3
        assert isinstance(mid.value.body, dict) and mid.value.body["code"] == "engine_error"


async def test_keep_alives_while_waiting_are_ignored_by_the_client(settings: Settings) -> None:
    waiting = settings.model_copy(update={"keepalive_s": 0.02, "synthetic_ttft_ms": 400})
    body = {"model": "synthetic", "prompt": "hi", "seed": SEED, "stream": True}
    async with openai_stack(waiting) as (base, http, api):
        async with http.post(f"{base}/v1/completions", json=body) as response:
            raw = await response.read()
        chunks = [
            c
            async for c in await api.completions.create(
                model="synthetic", prompt="hi", seed=SEED, stream=True
            )
        ]
    assert raw.startswith(b": keep-alive\n\n")
    want = expected(settings, 16, prompt="hi")
    assert "".join(json.loads(p)["choices"][0]["text"] for p in data_lines(raw)) == want
    assert "".join(c.choices[0].text for c in chunks) == want
