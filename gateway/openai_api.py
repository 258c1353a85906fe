"""OpenAI-compatible routes, so the official ``openai`` client works with only ``base_url`` set.

Models are the ones live workers announce (their heartbeats), not a static list. Each
completion request is one job on a session of its own (gateway.openai_jobs); with API keys
configured, every route here needs one.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import ApiError, json_body, validated
from gateway.openai_format import CHAT, TEXT, Kind, Reply
from gateway.openai_jobs import JobRun
from gateway.openai_models import ChatCompletionRequest, CompletionRequest
from gateway.openai_stream import collect, stream
from gateway.state import GATEWAY, Gateway, api_key

OWNER = "tokenbus"


def _model_object(model: str, seen: float) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(seen), "owned_by": OWNER}


def _gateway(request: web.Request) -> Gateway:
    """The gateway, once the request's API key checks out."""
    gw = request.app[GATEWAY]
    gw.require_api_key(api_key(request))
    return gw


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models some live worker serves now."""
    live = await _gateway(request).intake.live_models()
    data = [_model_object(model, seen) for model, seen in sorted(live.items())]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one of them, or 404 in OpenAI's error shape."""
    model = request.match_info["model"]
    live = await _gateway(request).intake.live_models()
    if model not in live:
        raise ApiError(404, "model_not_found", f"no live worker serves model '{model}'")
    return web.json_response(_model_object(model, live[model]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    gw = _gateway(request)
    body = validated(ChatCompletionRequest, await json_body(request))
    return await _answer(request, gw, CHAT, body)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions`` (legacy text completions)."""
    gw = _gateway(request)
    body = validated(CompletionRequest, await json_body(request))
    return await _answer(request, gw, TEXT, body)


async def _answer(
    request: web.Request, gw: Gateway, kind: Kind, body: ChatCompletionRequest | CompletionRequest
) -> web.StreamResponse:
    prompt = body.to_prompt()
    streaming = bool(body.stream)
    async with JobRun(gw, prompt, route=request.path, stream=streaming) as run:
        reply = Reply.for_job(kind, run.job, run.model, include_usage=body.include_usage)
        if streaming:
            return await stream(request, run, reply)
        try:
            return web.json_response(await collect(run, reply), headers=run.headers())
        except ApiError as exc:
            return exc.response(run.headers())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    # {model:.+}: hub ids such as Qwen/Qwen2.5-0.5B-Instruct contain a slash.
    app.router.add_get("/v1/models/{model:.+}", get_model)
