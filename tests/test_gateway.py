"""Gateway delivery on a real Redis, fed by the publish script (no worker involved)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from shared.close_codes import CLOSE_DRAINING
from shared.keys import Keys
from shared.protocol import Delta, StreamEnd, StreamStart
from shared.settings import Settings
from shared.stream.publish import SessionPublisher
from tests.clients import (
    answer_text,
    assert_contiguous,
    follow,
    read_sse_until,
    sse_events,
    ws_receive_until,
)
from tests.servers import running_gateway


def _publisher(redis: Redis, keys: Keys, settings: Settings) -> SessionPublisher:
    return SessionPublisher(
        redis, keys, history_maxlen=settings.history_maxlen, ttl_s=settings.history_ttl_s
    )


async def _publish_job(
    pub: SessionPublisher, session_id: str, job_id: str, words: list[str]
) -> None:
    await pub.publish(session_id, [StreamStart(job_id=job_id, model="m")])
    for word in words:
        await pub.publish(
            session_id, [Delta(job_id=job_id, delta=word, t=0.0)], job_id=job_id, text=word
        )
    await pub.publish(session_id, [StreamEnd(job_id=job_id, finish_reason="stop")])


async def _session(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.post(f"{base}/v1/sessions") as response:
        assert response.status == 201
        body: dict[str, Any] = await response.json()
        return body


WORDS = [f" w{i}" for i in range(30)]


async def test_late_subscriber_gets_whole_answer_from_history(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        await _publish_job(_publisher(redis, keys, settings), session["session_id"], "j1", WORDS)
        events = await read_sse_until(http, session["sse_url"])
        data = [e.data for e in events]
        assert [d["type"] for d in data[:2]] == ["stream_start", "delta"]
        assert answer_text(data) == "".join(WORDS)
        assert_contiguous(data)
        assert events[-1].id == f"{data[-1]['epoch']}:{len(WORDS) + 2}"


async def test_live_sse_and_ws_see_every_event_once_in_order(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            sse_task = asyncio.create_task(read_sse_until(http, session["sse_url"]))
            await asyncio.sleep(0.2)  # both are live before anything is published
            await _publish_job(_publisher(redis, keys, settings), sid, "j1", WORDS)
            ws_events = await ws_receive_until(ws)
            sse_data = [e.data for e in await sse_task]
        for events in (ws_events, sse_data):
            assert answer_text(events) == "".join(WORDS)
            assert_contiguous(events)


async def test_sse_resume_with_last_event_id_has_no_gap_and_no_duplicate(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        pub = _publisher(redis, keys, settings)
        await pub.publish(sid, [StreamStart(job_id="j1", model="m")])
        for word in WORDS[:10]:
            await pub.publish(sid, [Delta(job_id="j1", delta=word, t=0.0)])
        first = await read_sse_until(http, session["sse_url"], until_type="delta", count=4)
        last_id = first[-1].id
        assert last_id is not None
        for word in WORDS[10:]:
            await pub.publish(sid, [Delta(job_id="j1", delta=word, t=0.0)])
        await pub.publish(sid, [StreamEnd(job_id="j1", finish_reason="stop")])
        rest = await read_sse_until(http, session["sse_url"], headers={"Last-Event-ID": last_id})
        events = [e.data for e in first + rest]
        assert answer_text(events) == "".join(WORDS)
        assert_contiguous(events)


async def test_resume_from_trimmed_history_gets_resync(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    settings = settings.model_copy(update={"history_maxlen": 5})
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        pub = _publisher(redis, keys, settings)
        # Exact trimming: publish one event per call past a small MAXLEN ~ (trims whole nodes).
        await _publish_job(pub, sid, "j1", [f" x{i}" for i in range(300)])
        raw_epoch = await redis.hget(keys.session_meta(sid), "epoch")
        assert isinstance(raw_epoch, bytes)
        epoch = raw_epoch.decode()
        events = await read_sse_until(
            http, session["sse_url"], headers={"Last-Event-ID": f"{epoch}:1"}
        )
        resync = events[0].data
        assert resync["type"] == "resync" and resync["reason"] == "history_trimmed"
        assert resync["offset"] > 1
        assert events[0].id == f"{epoch}:{resync['offset']}"
        assert_contiguous([e.data for e in events[1:]], start=resync["offset"] + 1)
        assert events[-1].data["type"] == "stream_end"


async def test_resume_from_another_epoch_gets_resync(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        await _publish_job(_publisher(redis, keys, settings), sid, "j1", WORDS[:3])
        async with http.ws_connect(session["ws_url"]) as ws:
            await ws.send_json({"session_id": sid, "connect": True, "epoch": "gone", "offset": 3})
            events = await ws_receive_until(ws)
        assert events[0]["type"] == "connected"
        assert events[1] == {
            "type": "resync",
            "reason": "epoch_changed",
            "offset": 0,
            "epoch": events[2]["epoch"],
        }
        assert answer_text(events) == "".join(WORDS[:3])
        assert_contiguous(events[2:])


async def test_missing_or_wrong_token_is_refused(settings: Settings) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        events_url = f"{base}/v1/sessions/{sid}/events"
        for url in (events_url, f"{events_url}?token=v1.forged"):
            async with http.get(url) as response:
                assert response.status == 401
                body = await response.json()
                assert body["error"]["code"] == "unauthorized"
        other = await _session(http, base)
        async with http.get(f"{events_url}?token={other['token']}") as response:
            assert response.status == 401
        async with http.post(f"{base}/v1/sessions/{sid}/jobs", json={"prompt": "hi"}) as response:
            assert response.status == 401
        async with http.ws_connect(f"{base}/v1/ws") as ws:
            await ws.send_json({"session_id": sid, "connect": True, "token": other["token"]})
            error = await ws.receive_json()
            assert error["type"] == "error" and error["code"] == "unauthorized"
            closing = await ws.receive()
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4401


async def test_malformed_ws_messages_get_errors_and_connection_stays_usable(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        async with http.ws_connect(f"{base}/v1/ws") as ws:
            await ws.send_json({"type": "prompt", "prompt": "too early"})
            assert (await ws.receive_json())["code"] == "not_connected"
            await ws.send_json({"session_id": sid, "connect": True, "token": session["token"]})
            assert (await ws.receive_json())["type"] == "connected"
            bad: list[tuple[Any, str]] = [
                ("{not json", "bad_json"),
                ("[1, 2]", "bad_message"),
                ('{"type": "dance"}', "unknown_type"),
                ('{"type": "prompt"}', "invalid_request"),
                ('{"type": "prompt", "prompt": "x", "temperature": 9}', "invalid_request"),
                ('{"type": "prompt", "prompt": "x", "bogus": 1}', "invalid_request"),
                ('{"type": "prompt", "prompt": "x", "model": "nope"}', "model_not_found"),
                ('{"type": "cancel", "job_id": "job_unknown"}', "job_not_found"),
                ('{"session_id": "x", "connect": true}', "already_connected"),
            ]
            for text, code in bad:
                await ws.send_str(text)
                reply = await ws.receive_json()
                assert reply["type"] == "error" and reply["code"] == code, (text, reply)
                assert reply["message"]
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive_json())["code"] == "bad_frame"
            await ws.send_json({"type": "ping", "t": 7})
            assert await ws.receive_json() == {"type": "pong", "t": 7}
            # Still following the session after all that.
            await _publish_job(_publisher(redis, keys, settings), sid, "j1", WORDS[:5])
            events = await ws_receive_until(ws)
            assert answer_text(events) == "".join(WORDS[:5])


async def test_bad_http_requests_get_clear_errors(settings: Settings) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid, token = session["session_id"], session["token"]
        auth = {"Authorization": f"Bearer {token}"}
        jobs = f"{base}/v1/sessions/{sid}/jobs"
        cases: list[tuple[Any, int, str]] = [
            (b"{oops", 400, "bad_json"),
            ({"prompt": None}, 400, "invalid_request"),
            ({"prompt": "x", "max_tokens": 0}, 400, "invalid_request"),
            ({"prompt": "x", "model": "nope"}, 404, "model_not_found"),
            ({"prompt": "x" * (settings.max_prompt_chars + 1)}, 413, "prompt_too_large"),
            ({"prompt": "x" * settings.max_message_bytes}, 413, "request_too_large"),
            (
                {"prompt": "x", "max_tokens": settings.max_tokens_limit + 1},
                400,
                "max_tokens_too_large",
            ),
        ]
        for body, status, code in cases:
            kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with http.post(jobs, headers=auth, **kwargs) as response:
                payload = await response.json()
                assert response.status == status, (body, payload)
                assert payload["error"]["code"] == code
                assert payload["error"]["message"]
        async with http.get(
            f"{base}/v1/sessions/{sid}/events?last_event_id=x:y", headers=auth
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "bad_position"
        async with http.get(f"{jobs}/nope", headers=auth) as response:
            assert response.status == 404


async def test_pubsub_channels_are_reference_counted(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        channel = keys.session_channel(session["session_id"])

        async def subscribers() -> int:
            rows = await redis.pubsub_numsub(channel)
            return int(rows[0][1])

        async with http.ws_connect(session["ws_url"]) as a, http.ws_connect(session["ws_url"]) as b:
            for ws in (a, b):
                await follow(ws, session["session_id"])
            await asyncio.sleep(0.1)
            assert await subscribers() == 1  # one pub/sub connection for the whole process
        for _ in range(50):
            if await subscribers() == 0:
                break
            await asyncio.sleep(0.05)
        assert await subscribers() == 0


async def test_lost_pubsub_connection_is_recovered_from_history(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        pub = _publisher(redis, keys, settings)
        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            await pub.publish(sid, [StreamStart(job_id="j1", model="m")])
            for i, word in enumerate(WORDS):
                if i == 10:
                    await redis.client_kill_filter(_type="pubsub")
                await pub.publish(sid, [Delta(job_id="j1", delta=word, t=0.0)])
            await pub.publish(sid, [StreamEnd(job_id="j1", finish_reason="stop")])
            events = await ws_receive_until(ws)
        assert answer_text(events) == "".join(WORDS)
        assert_contiguous(events)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_endpoints(settings: Settings, path: str) -> None:
    async with (
        running_gateway(settings) as base,
        aiohttp.ClientSession() as http,
        http.get(base + path) as response,
    ):
        assert response.status == 200
        body = await response.json()
        assert body["status"] in ("ok", "ready")


async def test_slow_ws_client_is_dropped_with_4008_and_never_slows_others(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    settings = settings.model_copy(
        update={"client_queue_events": 64, "client_queue_bytes": 256 * 1024}
    )
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        pub = _publisher(redis, keys, settings)
        chunk = "x" * 65536
        n_chunks = 256  # 16 MiB: more than socket buffers hold for a client that reads nothing
        async with (
            http.ws_connect(session["ws_url"], max_msg_size=0) as slow,
            http.ws_connect(session["ws_url"], max_msg_size=0) as fast,
        ):
            for ws in (slow, fast):
                await follow(ws, sid)

            async def read_all() -> list[dict[str, Any]]:
                return await ws_receive_until(fast, timeout=60)

            reader = asyncio.create_task(read_all())
            await pub.publish(sid, [StreamStart(job_id="j1", model="m")])
            for i in range(n_chunks):
                await pub.publish(sid, [Delta(job_id="j1", delta=chunk, t=float(i))])
                # A paced producer: a reading client keeps up even on a loaded two-core CI
                # machine (seen dropped there once), while one that reads nothing still fills
                # its socket buffers and its queue.
                await asyncio.sleep(0.002)
            await pub.publish(sid, [StreamEnd(job_id="j1", finish_reason="stop")])
            fast_events = await reader
            # The fast client got everything, whole and in order, while the slow one lagged.
            assert answer_text(fast_events) == chunk * n_chunks
            assert_contiguous(fast_events)
            # The slow client is dropped with the code that says: resume from your offset.
            async with asyncio.timeout(30):
                while True:
                    message = await slow.receive()
                    if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        break
            assert slow.close_code == 4008


async def test_slow_sse_client_gets_slow_consumer_error_then_end_of_stream(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    settings = settings.model_copy(
        update={"client_queue_events": 64, "client_queue_bytes": 256 * 1024}
    )
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sid = session["session_id"]
        pub = _publisher(redis, keys, settings)
        chunk = "y" * 65536
        async with http.get(session["sse_url"]) as response:
            await asyncio.sleep(0.2)  # subscribed; now publish without reading
            await pub.publish(sid, [StreamStart(job_id="j1", model="m")])
            for i in range(256):
                await pub.publish(sid, [Delta(job_id="j1", delta=chunk, t=float(i))])
            events = []
            async with asyncio.timeout(60):
                async for event in sse_events(response):
                    events.append(event.data)
        last = events[-1]
        assert last["type"] == "error" and last["code"] == "slow_consumer"
        assert "Last-Event-ID" in last["message"]
        # What did arrive before the drop is in order, with no gap.
        assert_contiguous(events[:-1])


async def test_a_stopping_gateway_closes_its_websockets_with_the_drain_code(
    settings: Settings,
) -> None:
    """Clients are told at once to reconnect elsewhere, not left until the grace period ends."""
    gateway = running_gateway(settings)
    base = await gateway.__aenter__()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/sessions") as response:
            session = await response.json()
        ws = await http.ws_connect(session["ws_url"])
        await follow(ws, session["session_id"])
        stopping = asyncio.create_task(gateway.__aexit__(None, None, None))
        message = await ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CLOSE_DRAINING  # 1012, service restart
        await asyncio.wait_for(stopping, 30)
