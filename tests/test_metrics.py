"""Prometheus metrics of the gateway (/metrics) and of workers, on a real Redis and real sockets.

Only counts and presence are checked, never timings.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.metrics import GatewayMetrics
from shared.embedded_redis import free_port
from shared.jobs import enqueue
from shared.keys import Keys
from shared.protocol import Delta, Job, StreamEnd, StreamStart
from shared.settings import Settings
from shared.stream.publish import SessionPublisher
from tests.clients import answer_text, follow, read_sse_until, ws_receive_until
from tests.servers import (
    new_session,
    post_job,
    running_gateway,
    running_worker,
    settings_env,
    stack,
    wait_ready,
)

WAIT_S = 30.0  # a failsafe for hung tests, never a speed requirement

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def test_gateway_metrics_after_a_job_over_ws_and_sse(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        url = f"{base}/metrics"
        session = await new_session(http, base)
        sid = session["session_id"]

        async def ws_streams(n: float) -> bool:
            return value(await scrape(http, url), "tokenbus_active_streams", transport="ws") == n

        async with http.ws_connect(session["ws_url"]) as ws:
            await follow(ws, sid)
            # Counted once it follows the session live: the job's events reach the hub live.
            await eventually(lambda: ws_streams(1), "the WebSocket counted as an active stream")
            sse = asyncio.create_task(read_sse_until(http, session["sse_url"]))
            await asyncio.sleep(0.2)
            job_id = await post_job(http, session, {"prompt": "measure me"})
            ws_events = await ws_receive_until(ws)
            sse_events = [e.data for e in await sse]
            assert answer_text(ws_events, job_id) == answer_text(sse_events, job_id) != ""
            samples = await scrape(http, url)
            assert value(samples, "tokenbus_active_streams", transport="ws") == 1
        await eventually(lambda: ws_streams(0), "the closed WebSocket leaving active streams")

        samples = await scrape(http, url)
        for transport in ("ws", "sse"):
            delivered = value(samples, "tokenbus_events_delivered_total", transport=transport)
            assert delivered is not None and delivered > 0, transport
            # Live deltas went straight from the pub/sub reader to the socket, and the clients
            # above parsed them (their answers match): the direct path frames them correctly.
            direct = value(samples, "tokenbus_events_written_direct_total", transport=transport)
            assert direct is not None and 0 < direct <= delivered, transport
            drops = value(samples, "tokenbus_slow_client_drops_total", transport=transport)
            assert drops == 0
        assert (value(samples, "tokenbus_time_to_first_token_seconds_count") or 0) >= 1
        assert (value(samples, "tokenbus_inter_token_latency_seconds_count") or 0) >= 1
        assert (value(samples, "tokenbus_delivery_latency_seconds_count") or 0) >= 1
        assert value(samples, "tokenbus_queue_depth", model="synthetic") is not None
        assert value(samples, "tokenbus_pubsub_connected") == 1
        assert value(samples, "tokenbus_pubsub_channels") is not None


async def test_resync_is_counted_by_reason(settings: Settings, redis: Redis, keys: Keys) -> None:
    pub = SessionPublisher(
        redis, keys, history_maxlen=settings.history_maxlen, ttl_s=settings.history_ttl_s
    )
    async with running_gateway(settings) as base, aiohttp.ClientSession() as http:
        url = f"{base}/metrics"
        session = await new_session(http, base)
        sid = session["session_id"]
        await pub.publish(sid, [StreamStart(job_id="j1", model="m")])
        await pub.publish(sid, [Delta(job_id="j1", delta="hi", t=time.time())], job_id="j1")
        await pub.publish(sid, [StreamEnd(job_id="j1", finish_reason="stop")])
        before = await scrape(http, url)
        assert value(before, "tokenbus_resyncs_total", reason="epoch_changed") is None
        async with http.ws_connect(session["ws_url"]) as ws:
            await ws.send_json({"session_id": sid, "connect": True, "epoch": "gone", "offset": 3})
            events = await ws_receive_until(ws)
        assert [e["type"] for e in events[:2]] == ["connected", "resync"]
        after = await scrape(http, url)
        assert value(after, "tokenbus_resyncs_total", reason="epoch_changed") == 1


def test_gateway_job_timings_keep_bounded_state() -> None:
    metrics = GatewayMetrics(max_tracked_jobs=3)
    sample = metrics.registry.get_sample_value
    now = time.time()
    for i in range(5):
        job = f"j{i}"
        metrics.observe_live({"type": "stream_start", "job_id": job, "created_at": now - 1})
        metrics.observe_live({"type": "delta", "job_id": job, "t": now, "tokens": 1})
        metrics.observe_live({"type": "delta", "job_id": job, "t": now + 0.1, "tokens": 2})
        assert metrics.tracked_jobs <= 3
    assert sample("tokenbus_time_to_first_token_seconds_count") == 5
    assert sample("tokenbus_inter_token_latency_seconds_count") == 5
    for i in range(5):
        metrics.observe_live({"type": "stream_end", "job_id": f"j{i}", "finish_reason": "stop"})
    assert metrics.tracked_jobs == 0
    # Joined mid-answer (no stream_start seen): no time to first token, later gaps still count.
    metrics.observe_live({"type": "delta", "job_id": "late", "t": now, "tokens": 1})
    metrics.observe_live({"type": "delta", "job_id": "late", "t": now + 0.1, "tokens": 1})
    metrics.observe_live({"type": "delta", "job_id": "late", "t": "bad"})  # ignored
    assert sample("tokenbus_time_to_first_token_seconds_count") == 5
    assert sample("tokenbus_inter_token_latency_seconds_count") == 6


async def test_worker_metrics_in_process(settings: Settings, redis: Redis, keys: Keys) -> None:
    async with running_worker(settings) as worker:
        sample = worker.metrics.registry.get_sample_value
        assert sample("tokenbus_jobs_total", {"outcome": "done"}) == 0
        job = Job(session_id="s-metrics", prompt="count me")
        await enqueue(
            redis,
            keys,
            job,
            model=settings.model,
            jobs_maxlen=settings.jobs_maxlen,
            job_ttl_s=settings.job_ttl_s,
        )
        await redis.xadd(keys.jobs_stream(settings.model), {"job": json.dumps({"v": 1})})

        async def finished() -> bool:
            return (
                sample("tokenbus_jobs_total", {"outcome": "done"}) == 1
                and sample("tokenbus_jobs_total", {"outcome": "refused"}) == 1
                and sample("tokenbus_jobs_running") == 0
            )

        await eventually(finished, "the worker counting one job done and one refused")
        assert sample("tokenbus_time_to_first_token_seconds_count") == 1
        assert (sample("tokenbus_inter_token_latency_seconds_count") or 0) >= 1
        assert sample("tokenbus_tokens_generated_total") == settings.synthetic_tokens
        assert sample("tokenbus_jobs_total", {"outcome": "failed"}) == 0


async def test_worker_process_serves_metrics_on_its_port(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    port = free_port()
    env = settings_env(settings)
    env["TOKENBUS_METRICS_PORT"] = str(port)
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen([sys.executable, "-m", "workers"], env=env)
    try:
        await wait_ready(url, proc)
        job = Job(session_id="s-metrics-proc", prompt="count me too")
        await enqueue(
            redis,
            keys,
            job,
            model=settings.model,
            jobs_maxlen=settings.jobs_maxlen,
            job_ttl_s=settings.job_ttl_s,
        )
        async with aiohttp.ClientSession() as http:

            async def done() -> bool:
                samples = await scrape(http, url)
                return value(samples, "tokenbus_jobs_total", outcome="done") == 1

            await eventually(done, "the worker process counting the job")
            samples = await scrape(http, url)
        assert value(samples, "tokenbus_jobs_running") is not None
        assert (value(samples, "tokenbus_time_to_first_token_seconds_count") or 0) >= 1
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)
