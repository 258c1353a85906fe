"""OpenAI-compatible routes, so the official ``openai`` client works with only ``base_url`` set.

Models are the ones live workers announce (their heartbeats), not a static list.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import ApiError
from gateway.state import GATEWAY

OWNER = "tokenbus"


def _model_object(model: str, seen: float) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(seen), "owned_by": OWNER}


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models some live worker serves now."""
    live = await request.app[GATEWAY].intake.live_models()
    data = [_model_object(model, seen) for model, seen in sorted(live.items())]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one of them, or 404 in OpenAI's error shape."""
    model = request.match_info["model"]
    live = await request.app[GATEWAY].intake.live_models()
    if model not in live:
        raise ApiError(404, "model_not_found", f"no live worker serves model '{model}'")
    return web.json_response(_model_object(model, live[model]))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    # {model:.+}: hub ids such as Qwen/Qwen2.5-0.5B-Instruct contain a slash.
    app.router.add_get("/v1/models/{model:.+}", get_model)
