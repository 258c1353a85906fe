"""Errors the gateway answers with: one shape for HTTP (OpenAI's) and for WS/SSE events."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "server_error",
}

#: HTTP status for a job's terminal ``error`` event, by its code (OpenAI routes answer with it).
#: The request's fault is 400; a job that could not run in time 504; anything else is ours, 500.
JOB_ERROR_STATUS: dict[str, int] = {
    "context_length_exceeded": 400,
    "invalid_messages": 400,
    "invalid_request": 400,
    "invalid_sampling": 400,
    "invalid_job": 400,
    "no_chat_template": 400,
    "deadline_exceeded": 504,
    "too_many_attempts": 500,
    "engine_error": 500,
}


def error_event(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """An ``error`` event as WebSocket and SSE clients get it."""
    return {"type": "error", "code": code, "message": message, **extra}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def event(self) -> dict[str, Any]:
        return error_event(self.code, self.message)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object, as a response body or an SSE ``data:`` line."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "api_error"),
                "code": self.code,
                "param": self.param,
            }
        }

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=headers)


async def json_body(request: web.Request) -> object:
    """A request's JSON body (``{}`` when it has none), or the error that says what is wrong."""
    if not request.can_read_body:
        return {}
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"body is not JSON: {exc}") from exc
    except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's own error is plain text
        raise ApiError(
            413, "request_too_large", f"body is over {request.client_max_size} bytes"
        ) from exc


Body = TypeVar("Body", bound=BaseModel)


def validated(model: type[Body], body: object) -> Body:
    """``body`` as ``model``, or a 400 naming the first field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def from_validation(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return ApiError(400, "invalid_request", message, param=where or None)


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "missing or wrong session token")


def invalid_api_key() -> ApiError:
    return ApiError(
        401,
        "invalid_api_key",
        "missing or wrong API key: send 'Authorization: Bearer <key>' with a configured key",
    )


def job_error(code: str, message: str) -> ApiError:
    """The HTTP error for a job that ended with an ``error`` event."""
    status = JOB_ERROR_STATUS.get(code, 400 if code.startswith("invalid_") else 500)
    return ApiError(status, code, message)
