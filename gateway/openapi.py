"""The OpenAPI 3.1 document of the gateway's HTTP API, served at ``GET /openapi.json``.

It describes the routes the README documents, as it documents them. Request bodies come from
the pydantic models that validate them, so the two cannot drift apart; responses are written
here. tests/test_fuzz_api.py checks every route against it with schemathesis.
"""

from __future__ import annotations

import json
from typing import Any, TypeAlias

from aiohttp import web
from pydantic import BaseModel

from gateway.openai_models import ChatCompletionRequest, CompletionRequest
from gateway.requests import PromptRequest

Schema: TypeAlias = dict[str, Any]

_REF = "#/components/schemas/{model}"
_STRING: Schema = {"type": "string"}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


_STATUS_TEXT = {
    400: "The body, a field, a header or a parameter is wrong; the message names it "
    "(bad_json, bad_encoding, invalid_request, ...).",
    401: "Missing or wrong session token (unauthorized) or API key (invalid_api_key).",
    404: "No such model or job.",
    409: "The idempotency key was used on this session for another request (idempotency_conflict).",
    413: "The body or the prompt is too large (request_too_large, prompt_too_large).",
    429: "The model's queue is full (overloaded).",
    500: "The job failed in the engine (engine_error, too_many_attempts).",
    503: "No live worker serves the model (no_worker), or the broker is unreachable.",
    504: "The job could not start before its deadline (deadline_exceeded).",
}


def _errors(*statuses: int) -> dict[str, Schema]:
    return {str(status): _error(_STATUS_TEXT[status]) for status in statuses}


_SESSION_ID: Schema = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": _STRING,
    "description": "A session id, as POST /v1/sessions returned it.",
}
_JOB_ID: Schema = {"name": "job_id", "in": "path", "required": True, "schema": _STRING}
_IDEMPOTENCY_KEY: Schema = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    "description": "A repeat with the same key on the same session gets the same job (200); "
    "the same key with another body is a 409 (idempotency_conflict).",
}

_SESSION_AUTH: list[Schema] = [{"sessionToken": []}]
_API_KEY: list[Schema] = [{"apiKey": []}, {}]


def _hand_written() -> dict[str, Schema]:
    """Schemas of what the gateway answers (requests come from pydantic)."""
    usage = _object({k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens")})
    usage["properties"]["total_tokens"] = {"type": "integer"}
    usage["required"].append("total_tokens")
    nullable_string: Schema = {"type": ["string", "null"]}
    return {
        "Error": _object(
            {
                "error": _object(
                    {
                        "message": _STRING,
                        "type": _STRING,
                        "code": _STRING,
                        "param": nullable_string,
                    }
                )
            }
        ),
        "Session": _object(
            {name: _STRING for name in ("session_id", "token", "ws_url", "sse_url", "jobs_url")}
        ),
        "JobQueued": _object(
            {
                "job_id": _STRING,
                "session_id": _STRING,
                "model": _STRING,
                "state": {"const": "queued"},
            }
        ),
        "JobReplayed": _object(
            {
                "job_id": _STRING,
                "session_id": _STRING,
                "model": _STRING,
                "state": _STRING,
                "replayed": {"const": True},
            }
        ),
        "JobRecord": {
            **_object({"job_id": _STRING}, {"session_id": _STRING, "state": _STRING}),
            "additionalProperties": _STRING,
            "description": "The job's record as kept in Redis: every value is a string.",
        },
        "JobState": _object({"job_id": _STRING, "state": _STRING}),
        "Messages": _object(
            {
                "session_id": _STRING,
                "messages": {
                    "type": "array",
                    "items": _object(
                        {
                            "role": {"enum": ["system", "user", "assistant", "tool"]},
                            "content": _STRING,
                            "job_id": _STRING,
                        }
                    ),
                },
            }
        ),
        "Health": _object({"status": {"const": "ok"}}),
        "Ready": _object(
            {
                "status": {"enum": ["ready", "unavailable"]},
                "redis": {"type": "boolean"},
                "subscriber": {"type": "boolean"},
                "channels": {"type": "integer"},
            }
        ),
        "Model": _object(
            {
                "id": _STRING,
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": _STRING,
            }
        ),
        "ModelList": _object(
            {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}
        ),
        "Usage": usage,
        "ServerSentEvent": {
            **_object({"data": _STRING}, {"id": _STRING, "event": _STRING}),
            "description": "data: one JSON object (a session event, or an OpenAI chunk), or "
            "[DONE] at the end of an OpenAI stream; id: <epoch>:<offset> on session events.",
        },
        "Completion": {
            **_object(
                {
                    "id": _STRING,
                    "object": {"enum": ["chat.completion", "text_completion"]},
                    "created": {"type": "integer"},
                    "model": _STRING,
                    "choices": {"type": "array", "items": {"type": "object"}},
                    "usage": _ref("Usage"),
                }
            ),
            "description": "OpenAI's chat.completion (chat) or text_completion object.",
        },
    }


def _pydantic_schemas(schemas: dict[str, Schema]) -> None:
    """Add the request models' JSON schemas (and the models they use) to ``schemas``."""
    for model in (PromptRequest, ChatCompletionRequest, CompletionRequest):
        _add_model(schemas, model)


def _add_model(schemas: dict[str, Schema], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=_REF)
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema


def _body(name: str) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


#: One server-sent event (OpenAPI before 3.2 describes each event of a stream, not the stream).
_EVENT_STREAM = {"text/event-stream": {"schema": _ref("ServerSentEvent")}}


def _text_route(summary: str, media_type: str, description: str) -> Schema:
    content = {media_type: {"schema": _STRING}}
    return {"get": {"summary": summary, "responses": {"200": _text(description, content)}}}


def _text(description: str, content: Schema) -> Schema:
    return {"description": description, "content": content}


def _openai_route(body: str, summary: str) -> Schema:
    return {
        "post": {
            "summary": summary,
            "security": _API_KEY,
            "requestBody": _body(body),
            "responses": {
                "200": {
                    "description": "The answer: one object, or with stream true a stream of "
                    "chunks ending in 'data: [DONE]' (headers X-Tokenbus-Job-Id and "
                    "X-Tokenbus-Session-Id name the job and its session).",
                    "content": {
                        "application/json": {"schema": _ref("Completion")},
                        **_EVENT_STREAM,
                    },
                },
                **_errors(400, 401, 404, 413, 429, 500, 503, 504),
            },
        }
    }


def _paths() -> dict[str, Schema]:
    session = [_SESSION_ID]
    job = [_SESSION_ID, _JOB_ID]
    return {
        "/v1/sessions": {
            "post": {
                "summary": "Open a session",
                "security": _API_KEY,
                "responses": {
                    "201": _json(_ref("Session"), "The session, its token and its URLs."),
                    **_errors(401, 503),
                },
            }
        },
        "/v1/sessions/{session_id}/jobs": {
            "post": {
                "summary": "Send the session a job",
                "parameters": [*session, _IDEMPOTENCY_KEY],
                "security": _SESSION_AUTH,
                "requestBody": _body("PromptRequest"),
                "responses": {
                    "202": _json(_ref("JobQueued"), "The job is queued."),
                    "200": _json(
                        _ref("JobReplayed"),
                        "An earlier request with the same idempotency key made this job; "
                        "nothing was enqueued (header Idempotent-Replayed: true).",
                    ),
                    **_errors(400, 401, 404, 409, 413, 429, 503),
                },
            }
        },
        "/v1/sessions/{session_id}/jobs/{job_id}": {
            "get": {
                "summary": "A job's state",
                "parameters": job,
                "security": _SESSION_AUTH,
                "responses": {
                    "200": _json(_ref("JobRecord"), "The job's record."),
                    **_errors(401, 404, 503),
                },
            },
            "delete": {
                "summary": "Cancel a job",
                "parameters": job,
                "security": _SESSION_AUTH,
                "responses": {
                    "200": _json(_ref("JobState"), "The job had already ended."),
                    "202": _json(_ref("JobState"), "Cancelling."),
                    **_errors(401, 404, 503),
                },
            },
        },
        "/v1/sessions/{session_id}/events": {
            "get": {
                "summary": "Follow the session's events (SSE)",
                "parameters": [
                    _SESSION_ID,
                    {"name": "token", "in": "query", "schema": _STRING},
                    {"name": "last_event_id", "in": "query", "schema": _STRING},
                    {"name": "Last-Event-ID", "in": "header", "schema": _STRING},
                ],
                "security": [{"sessionToken": []}, {"sessionTokenQuery": []}],
                "responses": {
                    "200": _text("Events; each id: is <epoch>:<offset>.", _EVENT_STREAM),
                    **_errors(400, 401),
                },
            }
        },
        "/v1/sessions/{session_id}/messages": {
            op: {
                "summary": summary,
                "parameters": session,
                "security": _SESSION_AUTH,
                "responses": {
                    "200": _json(_ref("Messages"), "The remembered conversation, oldest first."),
                    **_errors(401, 503),
                },
            }
            for op, summary in (("get", "The session's conversation"), ("delete", "Forget it"))
        },
        "/v1/ws": {
            "get": {
                "summary": "The WebSocket (JSON text messages; see the README)",
                "parameters": [
                    {"name": "session_id", "in": "query", "schema": _STRING},
                    {"name": "token", "in": "query", "schema": _STRING},
                ],
                "responses": {
                    "101": {"description": "Switching to the WebSocket protocol."},
                    "400": _text("Not a WebSocket handshake.", {"text/plain": {"schema": _STRING}}),
                },
            }
        },
        "/v1/chat/completions": _openai_route("ChatCompletionRequest", "OpenAI chat completions"),
        "/v1/completions": _openai_route("CompletionRequest", "OpenAI text completions"),
        "/v1/models": {
            "get": {
                "summary": "Models live workers serve",
                "security": _API_KEY,
                "responses": {
                    "200": _json(_ref("ModelList"), "The models."),
                    **_errors(401),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model",
                "security": _API_KEY,
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": _STRING}
                ],
                "responses": {
                    "200": _json(_ref("Model"), "The model."),
                    **_errors(401, 404),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {"200": _json(_ref("Health"), "The process answers.")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis and the pub/sub subscriber",
                "responses": {
                    "200": _json(_ref("Ready"), "Ready."),
                    "503": _json(_ref("Ready"), "Not ready."),
                },
            }
        },
        "/metrics": _text_route("Prometheus metrics", "text/plain", "Prometheus text format."),
        "/": _text_route("The chat page", "text/html", "HTML, with its script and style."),
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
    }


def _bearer(description: str) -> Schema:
    return {"type": "http", "scheme": "bearer", "description": description}


def document() -> Schema:
    schemas = _hand_written()
    _pydantic_schemas(schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenbus gateway",
            "version": "1",
            "description": "Sessions, jobs, SSE, WebSocket and an OpenAI-compatible API. "
            'Errors are {"error": {"message", "type", "code", "param"}}.',
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": _bearer("One of TOKENBUS_API_KEYS, when it is set."),
                "sessionToken": _bearer("The session's token."),
                "sessionTokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")


# Built once: it depends only on the code.
_BODY = json.dumps(document(), indent=1).encode()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", serve)
