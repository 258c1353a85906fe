"""Fuzzing with hypothesis: the job decoder, the WebSocket protocol and the HTTP API.

Each target runs a fixed number of derandomized examples (see tests.fuzzing.fuzz_settings), so
a run is bounded and every run tries the same inputs. What must hold: the decoder gives a Job
or BadJob and nothing else; the gateway answers every message with events or a documented
close code, and every request with a status below 500; nothing logs an error.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.close_codes import (
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
)
from shared.codec import BadJob, decode_job, encode_job
from shared.protocol import Job
from shared.settings import Settings
from tests.conftest import report
from tests.fuzzing import BackgroundStack, fuzz_settings, watch_errors

DECODER_EXAMPLES = 250
WS_EXAMPLES = 80
HTTP_EXAMPLES = 150

# JSON values, nested a little and sometimes far too much.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.sampled_from(["\ud800", "a\udfffb", "\udc80", "é€😀", "", "x" * 300])
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def deep_json(draw: st.DrawFn) -> str:
    depth = draw(st.sampled_from([63, 64, 65, 200, 1_500, 5_000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = opener * depth + "1" + closer * depth
    return '{"session_id": "s", "prompt": "p", "x": ' + inner + "}"


JOB_FIELDS = [*Job.model_fields, "x"]
SAMPLING_FIELDS = ["temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty"]

# Objects shaped like jobs (the right names, any values), so validation gets past the first field.
job_like = st.fixed_dictionaries(
    {"session_id": st.sampled_from(["s-fuzz", "bad id", "\ud800"]) | st.text(max_size=4)},
    optional={
        **{name: json_values for name in JOB_FIELDS if name != "session_id"},
        "prompt": st.text(max_size=20) | st.just("\ud800"),
        "sampling": st.dictionaries(st.sampled_from(SAMPLING_FIELDS), json_values, max_size=3),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "x"]), "content": st.text(max_size=10)}
            ),
            max_size=3,
        ),
    },
)

# Mostly valid jobs, one odd value at most: the decoder's accepting side gets exercised too.
near_jobs = st.fixed_dictionaries(
    {
        "session_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True),
        "prompt": st.text(max_size=40),
    },
    optional={
        "id": st.text(min_size=1, max_size=20),
        "max_tokens": st.integers(min_value=0, max_value=2**70),
        "sampling": st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(-1, 3),
                "seed": st.integers(-(2**64), 2**65),
                "stop": st.lists(st.text(max_size=5), max_size=17),
            },
        ),
        "deadline": st.floats(),
        "on_disconnect": st.sampled_from(["cancel", "continue", "x"]),
        "v": st.integers(0, 2),
    },
)


def _packs(value: Any) -> bytes | None:
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
        return None


payloads = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    job_like.map(lambda v: json.dumps(v).encode()),
    job_like.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    job_like.map(_packs).filter(lambda b: b is not None),
    near_jobs.map(lambda v: json.dumps(v).encode()),
    near_jobs.map(_packs).filter(lambda b: b is not None),
    json_values.map(_packs).filter(lambda b: b is not None),
    deep_json().map(str.encode),
)
entry_fields = st.one_of(
    payloads.map(lambda p: {b"job": p}),
    st.dictionaries(st.binary(max_size=6), st.binary(max_size=16), max_size=3),
)


def test_fuzz_job_decoder_gives_a_job_or_bad_job() -> None:
    outcomes = {"job": 0, "bad": 0}

    @fuzz_settings(DECODER_EXAMPLES)
    @given(entry_fields)
    def check(fields: dict[bytes | str, bytes | str]) -> None:
        try:
            job = decode_job(fields)
        except BadJob as bad:
            outcomes["bad"] += 1
            assert bad.code in {"bad_entry", "bad_encoding", "invalid_job"}
            # What the worker writes to the dead-letter stream and the session must encode.
            bad.reason.encode()
            for name in (bad.job_id, bad.session_id):
                assert name is None or name.encode()
            return
        outcomes["job"] += 1
        # A decoded job can be written back (as the gateway enqueues it) and reads the same.
        again: dict[bytes | str, bytes | str] = {k: v for k, v in encode_job(job).items()}
        assert decode_job(again) == job

    check()
    report(f"fuzz job decoder: {sum(outcomes.values())} entries, {outcomes}")
    assert outcomes["job"] > 0 and outcomes["bad"] > 0


# The gateway, over real sockets


@pytest.fixture
def background(settings: Settings) -> Iterator[BackgroundStack]:
    with BackgroundStack(settings) as stack:
        yield stack


#: Every close code a client may get, and what it tells it (README, section WebSocket).
DOCUMENTED_CLOSES = {
    CLOSE_UNAUTHORIZED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAVAILABLE,
    1009,  # a message over TOKENBUS_MAX_MESSAGE_BYTES
    1007,  # a text frame that is not UTF-8
}
REPLY_TYPES = {
    "connected",
    "queued",
    "cancelling",
    "pong",
    "error",
    "stream_start",
    "delta",
    "stream_end",
    "resync",
}

PROMPT_FIELDS = ["prompt", "messages", "max_tokens", "temperature", "stop", "model", "ref", "seed"]
ws_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(["prompt", "cancel", "ping", "connect", "dance"]) | json_values},
    optional={
        name: json_values
        for name in [*PROMPT_FIELDS, "job_id", "t", "offset", "epoch", "session_id", "token"]
    },
)
ws_prompts = st.fixed_dictionaries(
    {"type": st.just("prompt"), "prompt": st.text(max_size=30)},
    optional={"max_tokens": st.integers(-2, 8), "ref": json_values, "stop": json_values},
)
ws_messages = st.one_of(
    st.text(max_size=40),
    json_values.map(json.dumps),
    ws_objects.map(lambda m: json.dumps(m)),
    ws_prompts.map(lambda m: json.dumps(m)),
    deep_json(),
    st.sampled_from(['{"type": "cancel"}', '{"type": "ping", "t": "\\ud800"}', "{" * 3000]),
)


async def _exchange(
    stack: BackgroundStack, connect: bool, messages: list[str], counts: dict[str, int]
) -> None:
    """Send ``messages``, each followed by a ping; everything back must be a known event."""
    session = stack.session
    async with stack.client().ws_connect(f"{stack.base}/v1/ws") as ws:
        if connect:
            await ws.send_json(
                {"session_id": session["session_id"], "connect": True, "token": session["token"]}
            )
            assert (await ws.receive_json(timeout=10))["type"] == "connected"
        for n, text in enumerate(messages):
            await ws.send_str(text)
            await ws.send_json({"type": "ping", "t": n})
            while True:
                message = await ws.receive(timeout=10)
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    assert ws.close_code in DOCUMENTED_CLOSES, (text[:80], ws.close_code)
                    counts["closed"] += 1
                    return
                assert message.type == aiohttp.WSMsgType.TEXT, (text[:80], message)
                event = json.loads(message.data)
                assert event.get("type") in REPLY_TYPES, (text[:80], event)
                if event["type"] == "error":
                    assert event["code"] and event["message"], event
                    counts["errors"] += 1
                if event == {"type": "pong", "t": n}:
                    break
            counts["messages"] += 1


def test_fuzz_websocket_protocol(background: BackgroundStack) -> None:
    counts = {"messages": 0, "errors": 0, "closed": 0}
    session = background.session
    # Connect messages, right and wrong: the wrong ones must close with 4401, nothing else.
    connects = st.fixed_dictionaries(
        {
            "connect": st.just(True),
            "session_id": st.just(session["session_id"]) | json_values,
            "token": st.sampled_from([session["token"], "v1.é", "\ud800", ""]) | json_values,
        },
        optional={"offset": st.integers(-1, 10**20) | json_values, "epoch": json_values},
    ).map(json.dumps)

    wrong_token = json.dumps({"connect": True, "session_id": session["session_id"], "token": "é"})

    @fuzz_settings(WS_EXAMPLES)
    @given(
        st.sampled_from(["connected", "not yet", "wrong token"]),
        st.lists(ws_messages | connects, min_size=1, max_size=4),
    )
    def check(opening: str, messages: list[str]) -> None:
        if opening == "wrong token":
            messages = [wrong_token, *messages]
        background.run(_exchange(background, opening == "connected", messages, counts))

    with watch_errors() as errors:
        check()
        assert background.alive()
    assert errors.summary() == []
    report(f"fuzz websocket: {WS_EXAMPLES} connections, {counts}")
    assert counts["errors"] > 0 and counts["closed"] > 0


# Routes that read a body are listed twice: that is where most of the input goes.
ROUTES = [
    ("POST", "/v1/sessions"),
    ("POST", "/v1/sessions/{sid}/jobs"),
    ("POST", "/v1/sessions/{sid}/jobs"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/sessions/{sid}/jobs/{job}"),
    ("DELETE", "/v1/sessions/{sid}/jobs/{job}"),
    ("GET", "/v1/sessions/{sid}/events"),
    ("GET", "/v1/sessions/{sid}/messages"),
    ("DELETE", "/v1/sessions/{sid}/messages"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{job}"),
]
_header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Encoding": st.sampled_from(["gzip", "deflate", "identity", "x-bogus"]),
        "Content-Type": st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-16",
                "application/json; charset=latin-1",
                "application/json; charset=nope",
                "text/plain; charset=base64",
            ]
        )
        | _header_text,
        "Last-Event-ID": _header_text | st.sampled_from(["²", "1" * 40, "e:1", ":", str(2**64)]),
    },
)
bodies = st.one_of(
    st.binary(max_size=80),
    json_values.map(lambda v: json.dumps(v).encode()),
    ws_prompts.map(lambda m: json.dumps(m).encode()),
    deep_json().map(str.encode),
    job_like.map(lambda v: json.dumps(v).encode()),
)
path_parts = st.sampled_from(["job_x", "%ED%A0%80", "%FF", "é", "a" * 300]) | st.text(
    alphabet=string.ascii_letters + string.digits + "-_.~%", min_size=1, max_size=12
)


async def _request(
    stack: BackgroundStack, method: str, url: str, headers: dict[str, str], body: bytes
) -> int:
    """Send one request and read the answer (the head only, for an event stream)."""
    async with stack.client().request(
        method,
        url,
        headers=headers,
        data=body or None,
        auto_decompress=False,
        skip_auto_headers=["Content-Type"],
    ) as response:
        if response.content_type != "text/event-stream":
            await response.read()
        return response.status


def test_fuzz_http_api(background: BackgroundStack) -> None:
    statuses: dict[int, int] = {}
    sid, token = background.session["session_id"], background.session["token"]

    # Mostly the right session and token, so requests get past authorization to the body.
    wrong = st.tuples(
        st.sampled_from([sid, "s_other"]) | path_parts,
        st.sampled_from([f"Bearer {token}", "Bearer v1.x", "", "Bearer é", "Basic x"]),
    )
    credentials = st.integers(0, 3).flatmap(
        lambda n: wrong if n == 3 else st.just((sid, f"Bearer {token}"))
    )

    @fuzz_settings(HTTP_EXAMPLES)
    @given(st.sampled_from(ROUTES), credentials, path_parts, headers, bodies)
    def check(
        route: tuple[str, str],
        credential: tuple[str, str],
        part: str,
        head: dict[str, str],
        body: bytes,
    ) -> None:
        method, template = route
        session_id, authorization = credential
        url = background.base + template.format(sid=session_id, job=part)
        if authorization:
            head = {**head, "Authorization": authorization}
        status = background.run(_request(background, method, url, head, body))
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (method, url, head, body[:80])

    with watch_errors() as errors:
        check()
        assert background.alive()
    assert errors.summary() == []
    report(
        f"fuzz http api: {sum(statuses.values())} requests, by status {sorted(statuses.items())}"
    )
    assert not any(status >= 500 for status in statuses)
