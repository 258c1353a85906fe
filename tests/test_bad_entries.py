"""Jobs-stream entries that are not jobs: decode_job raises BadJob, a real worker dead-letters them.

Entries are XADDed raw, as another service would write them, to a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis

from shared.codec import MAX_DEPTH, BadJob, decode_job, dump_event
from shared.keys import JOBS_GROUP, Keys
from shared.settings import Settings
from shared.stream.position import HISTORY_FIELD
from tests.servers import running_worker

WAIT_S = 30.0  # a failsafe for hung tests, never a speed requirement


def nested_json(depth: int) -> str:
    return '{"session_id": "s", "prompt": "p", "x": ' + "[" * depth + "]" * depth + "}"


def nested_msgpack(depth: int) -> bytes:
    # Packed by hand: msgpack.packb itself refuses to nest this deep.
    inner = b"\x91" * depth + b"\x90"  # fixarray(1) ... fixarray(0)
    head = bytes(msgpack.packb({"session_id": "s", "prompt": "p"}))
    return b"\x83" + head[1:] + b"\xa1x" + inner  # the same map with one more key, "x"


@pytest.mark.parametrize(
    ("payload", "code", "says"),
    [
        ('{"a":' * 100_000, "bad_encoding", "nested deeper"),
        (nested_json(100_000), "bad_encoding", "nested deeper"),
        (nested_json(MAX_DEPTH), "bad_encoding", "nested deeper"),
        (nested_msgpack(100_000), "bad_encoding", "msgpack"),
        (nested_msgpack(MAX_DEPTH + 5), "bad_encoding", "nested deeper"),
        (
            '{"session_id": "s", "prompt": "p", "attempt": ' + "9" * 5000 + "}",
            "bad_encoding",
            "digits",
        ),
        ('{"session_id": "s", "prompt": "p", "max_tokens": 1e999}', "invalid_job", "max_tokens"),
        ('{"session_id": "s", "prompt": "p", "deadline": NaN}', "invalid_job", "deadline"),
        ('{"session_id": "s", "prompt": "p", "deadline": Infinity}', "invalid_job", "deadline"),
        (
            '{"session_id": "s", "prompt": "p", "sampling": {"temperature": NaN}}',
            "invalid_job",
            "sampling.temperature",
        ),
        (
            msgpack.packb({"session_id": "s", "prompt": "p", "deadline": math.nan}),
            "invalid_job",
            "deadline",
        ),
        (msgpack.packb({"session_id": "s", "prompt": "p", "max_tokens": 2**64 - 1}), "", ""),
        ('{"session_id": "s", "prompt": "\\ud800"}', "invalid_job", "surrogate"),
        (
            '{"session_id": "s", "messages": [{"role": "user", "content": "\\udc00"}]}',
            "invalid_job",
            "messages.0.content",
        ),
        (
            '{"session_id": "s", "prompt": "p", "sampling": {"stop": ["\\ud800"]}}',
            "invalid_job",
            "sampling.stop.0",
        ),
        ('{"session_id": "s", "prompt": "p", "\\ud800": 1}', "invalid_job", "job"),
        # CESU-8: json.loads lets encoded surrogates through; the Job refuses them.
        (b'{"session_id": "s", "prompt": "\xed\xa0\x80"}', "invalid_job", "surrogate"),
        (b'{"session_id": "s", "prompt": "\xff"}', "bad_encoding", "UTF-8"),
        (b"\xc1", "bad_encoding", "msgpack"),
        (b"", "bad_encoding", "msgpack"),
    ],
)
def test_decode_job_raises_bad_job_for_every_bad_payload(
    payload: str | bytes, code: str, says: str
) -> None:
    fields: dict[bytes | str, bytes | str] = {
        b"job": payload.encode() if isinstance(payload, str) else payload
    }
    if not code:  # well-formed: the worker's own limits refuse it later
        assert decode_job(fields).max_tokens == 2**64 - 1
        return
    with pytest.raises(BadJob) as caught:
        decode_job(fields)
    assert caught.value.code == code
    assert says in caught.value.reason, caught.value.reason
    # Whatever it says is writable to Redis and to a log line.
    caught.value.reason.encode()
    assert caught.value.session_id in (None, "s")


def test_decode_job_survives_odd_field_names_and_text_payloads() -> None:
    with pytest.raises(BadJob) as caught:
        decode_job({b"\xff\xfe": b"x"})
    assert caught.value.code == "bad_entry"
    with pytest.raises(BadJob) as caught:
        decode_job({"job": '{"session_id": "s", "prompt": "\ud800"}'})  # str, as a caller may pass
    assert caught.value.code == "invalid_job"
    bad = BadJob("invalid_job", "odd \udc80 reason", {"id": "\ud800", "session_id": "ok"})
    assert (bad.reason, bad.job_id, bad.session_id) == ("odd \\udc80 reason", None, "ok")


def test_dump_event_escapes_what_utf8_cannot_carry() -> None:
    event = {"type": "pong", "t": "a\ud800b", "ref": {"\udc80": "é"}}
    text = dump_event(event)
    text.encode()
    assert json.loads(text) == event
    assert dump_event({"delta": "é"}) == '{"delta":"é"}'  # valid text stays as it is


def _text(value: bytes | str | None) -> str:
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value


async def _entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """A stream's entries, ids and fields as text."""
    out = []
    for entry_id, fields in await redis.xrange(key) or []:
        assert fields is not None
        out.append((_text(entry_id), {_text(k): _text(v) for k, v in fields.items()}))
    return out


async def _history(redis: Redis, keys: Keys, session_id: str) -> list[dict[str, Any]]:
    entries = await _entries(redis, keys.session_history(session_id))
    return [json.loads(fields[HISTORY_FIELD]) for _, fields in entries]


async def _eventually(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (result := await check()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)
    return result


async def test_worker_dead_letters_poison_entries_and_serves_the_next_job(
    settings: Settings, keys: Keys, redis: Redis
) -> None:
    stream = keys.jobs_stream(settings.model)
    poison: list[tuple[bytes, str, str | None]] = [
        (nested_json(100_000).encode(), "bad_encoding", None),
        (b'{"a":' * 100_000, "bad_encoding", None),
        (nested_msgpack(100_000), "bad_encoding", None),
        (b'{"id": "j-sur", "session_id": "s-sur", "prompt": "\\ud800"}', "invalid_job", "s-sur"),
        (
            b'{"id": "j-nan", "session_id": "s-nan", "prompt": "p", "deadline": NaN}',
            "invalid_job",
            "s-nan",
        ),
        (
            b'{"id": "j-key", "session_id": "s-key", "prompt": "p", "\\udc80": 1}',
            "invalid_job",
            "s-key",
        ),
        (b'{"id": "\\ud800", "session_id": "s-id", "prompt": "p"}', "invalid_job", "s-id"),
    ]
    async with running_worker(settings) as worker:
        ids = [await redis.xadd(stream, {"job": payload}) for payload, _, _ in poison]
        good = {"id": "j-good", "session_id": "s-good", "prompt": "after the poison"}
        await redis.xadd(stream, {"job": json.dumps(good)})

        async def good_ended() -> list[dict[str, Any]]:
            events = await _history(redis, keys, "s-good")
            return events if events and events[-1]["type"] == "stream_end" else []

        events = await _eventually(good_ended, "the good job's end")
        assert events[0]["type"] == "stream_start"

        async def all_dead() -> list[tuple[str, dict[str, str]]]:
            dead = await _entries(redis, keys.dead_letter)
            return dead if len(dead) == len(poison) else []

        dead = await _eventually(all_dead, "every poison entry in the dead-letter stream")
        assert worker.ready.is_set()
    records = [fields for _, fields in dead]
    for record, entry_id, (_, code, session_id) in zip(records, ids, poison, strict=True):
        assert (record["entry_id"], record["code"]) == (_text(entry_id), code)
        assert record["reason"]
        assert record.get("session_id") == session_id
        if session_id is not None:
            errors = await _history(redis, keys, session_id)
            assert [(e["type"], e["code"]) for e in errors] == [("error", code)]
            assert errors[0]["message"] == record["reason"]
    assert "surrogate" in records[3]["reason"] and "deadline" in records[4]["reason"]
    # Nothing left pending: no entry waits for a worker that can never take it.
    assert (await redis.xpending(stream, JOBS_GROUP))["pending"] == 0
