"""The aiohttp application: sessions, jobs, WebSocket, SSE, health and metrics routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from gateway import openai_api, openapi, sse, web_page, ws
from gateway.drain import DRAIN, Drain, drain_aware, drain_guard, end_on_shutdown
from gateway.errors import ApiError, json_body, undecodable_bodies, validated
from gateway.hub import Hub
from gateway.intake import IDEMPOTENCY_HEADER, REPLAYED_HEADER, Intake
from gateway.metrics import GatewayMetrics
from gateway.requests import PromptRequest
from gateway.state import GATEWAY, Gateway, api_key, bearer
from shared.conversation import Conversations
from shared.jobs import TERMINAL_STATES, get_record, queue_depth, request_cancel
from shared.keys import Keys
from shared.logs import log
from shared.protocol import new_id
from shared.redis_client import connect
from shared.settings import Settings, redact_url
from shared.stream.history import History
from shared.tokens import shared_secret

logger = logging.getLogger("tokenbus.gateway")


def _base_urls(request: web.Request, settings: Settings) -> tuple[str, str]:
    base = settings.public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    return base, "ws" + base[4:] if base.startswith("http") else base


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except RedisError as exc:
        log(logger, "redis_error", logging.ERROR, path=request.path, error=str(exc))
        return ApiError(503, "redis_unavailable", "the broker is unreachable; retry").response()


async def create_session(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.require_api_key(api_key(request))
    session_id = new_id("s_")
    token = gw.token(session_id)
    base, ws_base = _base_urls(request, gw.settings)
    log(logger, "session_created", session=session_id)
    return web.json_response(
        {
            "session_id": session_id,
            "token": token,
            "ws_url": f"{ws_base}/v1/ws?" + urlencode({"session_id": session_id, "token": token}),
            "sse_url": f"{base}/v1/sessions/{session_id}/events?" + urlencode({"token": token}),
            "jobs_url": f"{base}/v1/sessions/{session_id}/jobs",
        },
        status=201,
    )


def _session(request: web.Request) -> tuple[Gateway, str]:
    """The gateway and the request's session, once its token checks out."""
    gw = request.app[GATEWAY]
    session_id = request.match_info["session_id"]
    gw.authorize(session_id, bearer(request))
    return gw, session_id


async def create_job(request: web.Request) -> web.Response:
    gw, session_id = _session(request)
    prompt = validated(PromptRequest, await json_body(request))
    key = request.headers.get(IDEMPOTENCY_HEADER)
    done = await gw.intake.accept(session_id, prompt, idempotency_key=key)
    job = done.job
    body = {"job_id": job.id, "session_id": session_id, "model": job.model, "state": done.state}
    if done.replayed:  # an earlier request with this idempotency key made the job
        log(logger, "job_replayed", session=session_id, job=job.id)
        return web.json_response(
            {**body, "replayed": True}, status=200, headers={REPLAYED_HEADER: "true"}
        )
    log(logger, "job_enqueued", session=session_id, job=job.id, model=job.model)
    return web.json_response(body, status=202)


async def _job_record(request: web.Request) -> tuple[Gateway, str, dict[str, str]]:
    gw, session_id = _session(request)
    job_id = request.match_info["job_id"]
    record = await get_record(gw.redis, gw.keys, job_id)
    if record.get("session_id") != session_id:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} on this session")
    return gw, job_id, record


async def get_job(request: web.Request) -> web.Response:
    _, job_id, record = await _job_record(request)
    return web.json_response({"job_id": job_id, **record})


async def cancel_job(request: web.Request) -> web.Response:
    gw, job_id, record = await _job_record(request)
    if record.get("state") in TERMINAL_STATES:
        return web.json_response({"job_id": job_id, "state": record["state"]})
    await request_cancel(gw.redis, gw.keys, job_id, reason="http", ttl_s=gw.settings.job_ttl_s)
    log(logger, "job_cancel_requested", job=job_id)
    return web.json_response({"job_id": job_id, "state": "cancelling"}, status=202)


async def get_messages(request: web.Request) -> web.Response:
    """The session's remembered conversation, oldest first (what later prompts see)."""
    gw, session_id = _session(request)
    exchanges = await gw.conversations.load(session_id)
    messages = [
        {"role": m.role, "content": m.content, "job_id": e.job_id}
        for e in exchanges
        for m in e.turns()
    ]
    return web.json_response({"session_id": session_id, "messages": messages})


async def forget_messages(request: web.Request) -> web.Response:
    gw, session_id = _session(request)
    await gw.conversations.forget(session_id)
    log(logger, "conversation_forgotten", session=session_id)
    return web.json_response({"session_id": session_id, "messages": []})


@drain_aware
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@drain_aware
async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.drain.draining:  # a load balancer stops sending work here before the process ends
        return web.json_response({"status": "draining"}, status=503)
    try:
        redis_ok = bool(await gw.redis.ping())
    except RedisError:
        redis_ok = False
    ready = redis_ok and gw.hub.alive
    body = {
        "status": "ready" if ready else "unavailable",
        "redis": redis_ok,
        "subscriber": gw.hub.alive,
        "channels": gw.hub.channels,
    }
    return web.json_response(body, status=200 if ready else 503)


@drain_aware
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; queue depths and pub/sub state are read now."""
    gw = request.app[GATEWAY]
    m = gw.metrics
    m.pubsub_channels.set(gw.hub.channels)
    m.pubsub_connected.set(1 if gw.hub.alive else 0)
    try:
        depths = {
            model: await queue_depth(gw.redis, gw.keys, model)
            for model in await gw.intake.live_models()
        }
    except RedisError as exc:  # the rest is still worth scraping
        log(logger, "metrics_queue_depth_failed", logging.WARNING, error=str(exc))
    else:
        m.queue_depth.clear()  # a model no worker serves any more drops out
        for model, depth in depths.items():
            m.queue_depth.labels(model).set(depth)
    return web.Response(
        body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[undecodable_bodies, drain_guard, api_errors],
        client_max_size=settings.max_message_bytes,
    )
    app[DRAIN] = drain = Drain()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        keys = Keys(settings.key_prefix)
        redis = connect(settings)
        gateway_metrics = GatewayMetrics()
        # No retries on the hub's client: it must see each lost connection to recover from it.
        hub = Hub(connect(settings, retries=0), on_live=gateway_metrics.observe_live)
        await hub.start()
        secret = await shared_secret(redis, keys, settings.secret)
        app[GATEWAY] = Gateway(
            settings=settings,
            keys=keys,
            redis=redis,
            hub=hub,
            history=History(redis, keys),
            intake=(intake := Intake(redis, keys, settings)),
            conversations=Conversations.from_settings(redis, keys, settings),
            secret=secret,
            metrics=gateway_metrics,
            drain=drain,
        )
        log(
            logger,
            "gateway_ready",
            redis=redact_url(settings.redis_url),
            prefix=settings.key_prefix,
        )
        yield
        await hub.close()
        await intake.aclose()
        await redis.aclose()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_on_shutdown)
    app.router.add_post("/v1/sessions", create_session)
    app.router.add_post("/v1/sessions/{session_id}/jobs", create_job)
    app.router.add_get("/v1/sessions/{session_id}/jobs/{job_id}", get_job)
    app.router.add_delete("/v1/sessions/{session_id}/jobs/{job_id}", cancel_job)
    app.router.add_get("/v1/sessions/{session_id}/events", sse.session_events)
    app.router.add_get("/v1/sessions/{session_id}/messages", get_messages)
    app.router.add_delete("/v1/sessions/{session_id}/messages", forget_messages)
    ws.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    openai_api.add_routes(app)
    openapi.add_routes(app)
    web_page.add_routes(app)
    return app
