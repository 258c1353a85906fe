"""Bad input gets a clear error and never crashes anything: each case found by hand, once each.

Real sockets and a real Redis; tests/test_fuzz*.py then throws generated input at the same code.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from shared.close_codes import CLOSE_UNAUTHORIZED
from shared.settings import Settings
from tests.clients import follow
from tests.servers import auth, new_session, running_gateway, stack

DEEP = 2_500  # past Python's recursion limit: json.loads raised RecursionError here
NESTED = "[" * DEEP + "]" * DEEP


async def raw_request(base: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send exact bytes (headers aiohttp's client would refuse to write); status and body."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["message"], error
    return error


# 1. Tokens and API keys that are not ASCII


async def test_non_ascii_tokens_get_401_and_ws_4401(settings: Settings) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await new_session(http, base)
        sid = session["session_id"]
        events = f"/v1/sessions/{sid}/events"
        for query in ("token=v1.%C3%A9t%C3%A9", "token=%E2%82%AC", "token=%FF%FE"):
            async with http.get(f"{base}{events}?{query}") as response:
                assert response.status == 401, query
                assert (await response.json())["error"]["code"] == "unauthorized"
        # Header bytes that are not UTF-8 reach the handler as surrogates (surrogateescape).
        for token in ("v1.é".encode(), b"v1.\xff\xfe", "€".encode()):
            for path in (events, f"/v1/sessions/{sid}/jobs"):
                method = b"GET" if path == events else b"POST"
                head = b"%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % (
                    method,
                    path.encode(),
                    token,
                )
                status, body = await raw_request(base, head, b"{}" if method == b"POST" else b"")
                assert status == 401, (path, token, body)
                assert error_of(body)["code"] == "unauthorized"
        # On a WebSocket: in the connect message (as text, and as a JSON escape that makes a
        # lone surrogate), and in the URL.
        for raw in (
            json.dumps({"session_id": sid, "connect": True, "token": "v1.é"}),
            json.dumps({"session_id": sid, "connect": True, "token": "v1."}).replace(
                '"v1."', '"v1.\\ud800"'
            ),
        ):
            async with http.ws_connect(f"{base}/v1/ws") as ws:
                await ws.send_str(raw)
                error = await ws.receive_json()
                assert (error["type"], error["code"]) == ("error", "unauthorized"), raw
                closing = await ws.receive()
                assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, CLOSE_UNAUTHORIZED)
        # A session id that is not text at all is a bad field, not a bad token: no close.
        async with http.ws_connect(f"{base}/v1/ws") as ws:
            await ws.send_str('{"session_id": "\\udc80", "connect": true, "token": "x"}')
            error = await ws.receive_json()
            assert (error["code"], error["message"].split(":")[0]) == (
                "invalid_request",
                "session_id",
            )
            await ws.send_json({"type": "ping"})
            assert await ws.receive_json() == {"type": "pong"}
        async with http.ws_connect(f"{base}/v1/ws?session_id={sid}&token=%C3%A9") as ws:
            await ws.send_json({"connect": True})
            assert (await ws.receive_json())["code"] == "unauthorized"
            assert (await ws.receive()).data == CLOSE_UNAUTHORIZED


async def test_non_ascii_api_keys_get_401(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": "key-one,kéy-two"})
    async with running_gateway(keyed) as base:
        for key in ("kéy-one".encode(), b"key-\xff", "kéy-two".encode("latin-1")):
            for method, path in ((b"POST", b"/v1/sessions"), (b"GET", b"/v1/models")):
                head = b"%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % (
                    method,
                    path,
                    key,
                )
                status, body = await raw_request(base, head)
                assert status == 401, (path, key, body)
                assert error_of(body)["code"] == "invalid_api_key"
        # A configured key that is not ASCII still works, sent as UTF-8.
        status, body = await raw_request(
            base,
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            % "kéy-two".encode(),
        )
        assert status == 201, body


# 2. JSON nested too deep


async def test_deeply_nested_json_is_400_bad_json(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        deep_field = '{"prompt": "x", "stop": ' + "[" * 100 + "]" * 100 + "}"
        huge_int = '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}"
        for url, headers in (
            (session["jobs_url"], auth(session)),
            (f"{base}/v1/chat/completions", {}),
            (f"{base}/v1/completions", {}),
        ):
            for body in (NESTED, deep_field, huge_int):
                async with http.post(url, data=body, headers=headers) as response:
                    error = (await response.json())["error"]
                    assert response.status == 400, (url, body[:40], error)
                    assert error["code"] == "bad_json"
                    assert ("nested deeper" in error["message"]) == (body != huge_int)


async def test_deeply_nested_json_on_a_websocket_is_an_error_event(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        async with http.ws_connect(session["ws_url"]) as ws:
            for raw in (NESTED, '{"type": "ping", "t": ' + "[" * 80 + "]" * 80 + "}"):
                await ws.send_str(raw)
                error = await ws.receive_json()
                assert (error["type"], error["code"]) == ("error", "bad_json")
                assert "nested deeper" in error["message"]
            # Still usable: connect, and run a job to its end.
            await follow(ws, session["session_id"])
            await ws.send_json({"type": "prompt", "prompt": "still here", "max_tokens": 4})
            assert (await ws.receive_json())["type"] == "queued"
            while (event := await ws.receive_json())["type"] != "stream_end":
                assert event["type"] in ("stream_start", "delta"), event


# 3. Bodies that cannot be decoded


async def test_bad_content_encoding_and_charset_are_400(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        path = urlsplit(session["jobs_url"]).path.encode()
        token = session["token"].encode()
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % (path, token)
        job = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        cases = [
            (b"Content-Encoding: gzip\r\n", b"this is not gzip", "Content-Encoding 'gzip'"),
            (b"Content-Encoding: deflate\r\n", b"nor deflate" * 50, "Content-Encoding 'deflate'"),
            (b"Content-Type: application/json; charset=klingon\r\n", job, "unknown charset"),
            (b"Content-Type: application/json; charset=base64\r\n", job, "unknown charset"),
            (b"Content-Type: application/json; charset=utf-16\r\n", b"{}x", "not valid"),
            (b"Content-Type: application/json\r\n", b'{"prompt": "\xff"}', "not valid"),
        ]
        for extra, body, says in cases:
            status, reply = await raw_request(base, head + extra, body)
            error = error_of(reply)
            assert (status, error["code"]) == (400, "bad_encoding"), (extra, body[:20], reply)
            assert says in error["message"]
        # The same job, properly gzipped, is accepted.
        status, reply = await raw_request(
            base, head + b"Content-Encoding: gzip\r\n", gzip.compress(job)
        )
        assert status == 202, reply


# 4. Lone surrogates


SURROGATE = "\\ud800"  # as JSON text: valid JSON, but no valid Unicode


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
        ('{"prompt": "\\udfff tail"}', "prompt"),
        ('{"prompt": "x", "stop": ["ok", "\\ud800"]}', "stop.1"),
        ('{"prompt": "x", "stop": "\\ud800"}', "stop.0"),
        ('{"prompt": "x", "model": "\\ud83d"}', "model"),
    ],
)
async def test_lone_surrogates_are_400_naming_the_field(
    settings: Settings, body: str, field: str
) -> None:
    async with stack(settings) as (base, http):
        session = await new_session(http, base)
        async with http.post(session["jobs_url"], data=body, headers=auth(session)) as response:
            error = (await response.json())["error"]
            assert response.status == 400, error
        assert (error["code"], error["param"]) == ("invalid_request", field)
        assert "surrogate" in error["message"]
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, session["session_id"])
            await ws.send_str('{"type": "prompt", "ref": "r1", ' + body[1:])
            event = await ws.receive_json()
            assert (event["type"], event["code"], event["ref"]) == (
                "error",
                "invalid_request",
                "r1",
            )
            assert event["message"].startswith(field + ":")


async def test_lone_surrogates_on_openai_routes_and_ws_echoes(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        cases = [
            ("chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
            (
                "chat/completions",
                '{"messages": [{"role": "user", '
                '"content": [{"type": "text", "text": "\\ud800"}]}]}',
            ),
            (
                "chat/completions",
                '{"messages": [{"role": "user", "content": "a"}], "stop": "\\ud800"}',
            ),
            ("completions", '{"prompt": "\\ud800"}'),
            ("completions", '{"prompt": ["\\ud800"]}'),
        ]
        for route, body in cases:
            async with http.post(f"{base}/v1/{route}", data=body) as response:
                error = (await response.json())["error"]
                assert (response.status, error["code"]) == (400, "invalid_request"), body
                assert "surrogate" in error["message"] and error["param"]
        # What a WebSocket echoes back (ping's t, a prompt's ref) arrives as it was sent.
        session = await new_session(http, base)
        async with http.ws_connect(session["ws_url"]) as ws:
            await ws.send_str('{"type": "ping", "t": "\\ud800"}')
            assert await ws.receive_json() == {"type": "pong", "t": "\ud800"}
            await ws.send_str('{"type": "\\ud800"}')
            assert (await ws.receive_json())["code"] == "not_connected"
            await follow(ws, session["session_id"])
            await ws.send_str('{"type": "cancel", "job_id": "\\ud800"}')
            error = await ws.receive_json()
            assert (error["code"], error["message"].split(":")[0]) == ("invalid_request", "job_id")
            await ws.send_str('{"type": "prompt", "prompt": "x", "ref": {"\\ud800": [1]}}')
            event = await ws.receive_json()
            assert (event["type"], event["ref"]) == ("queued", {"\ud800": [1]})


# Positions no stream can have


async def test_impossible_resume_positions_are_refused(settings: Settings) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await new_session(http, base)
        events = f"{base}/v1/sessions/{session['session_id']}/events"
        # "²" passes str.isdigit(); 2**64 is past any Redis stream id.
        for position in ("e:²", "e:١٢", str(2**64), "e:" + "9" * 30):
            async with http.get(events, headers={**auth(session), "Last-Event-ID": position}) as r:
                assert r.status == 400, position
                assert (await r.json())["error"]["code"] == "bad_position"
        async with http.ws_connect(f"{base}/v1/ws") as ws:
            sid, token = session["session_id"], session["token"]
            await ws.send_json(
                {"session_id": sid, "connect": True, "token": token, "offset": 2**64}
            )
            error = await ws.receive_json()
            assert (error["code"], error["message"].split(":")[0]) == ("invalid_request", "offset")
            await follow(ws, sid, token=token, offset=2**63 - 1)


async def test_oversized_and_non_utf8_frames_close_with_their_codes(settings: Settings) -> None:
    small = settings.model_copy(update={"max_message_bytes": 1000})
    async with running_gateway(small) as base, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{base}/v1/ws") as ws:
            await ws.send_str("x" * 2000)
            assert (await ws.receive(timeout=10)).data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        async with http.ws_connect(f"{base}/v1/ws") as ws:
            # aiohttp's client only sends valid text; write the frame beneath it.
            assert ws._writer is not None
            await ws._writer.send_frame(b'{"type": "\xff"}', aiohttp.WSMsgType.TEXT)
            assert (await ws.receive(timeout=10)).data == aiohttp.WSCloseCode.INVALID_TEXT
