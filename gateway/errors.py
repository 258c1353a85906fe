"""Errors the gateway answers with: one shape for HTTP (OpenAI's) and for WS/SSE events."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
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

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "api_error"),
                "code": self.code,
                "param": self.param,
            }
        }
        return web.json_response(body, status=self.status)


def from_validation(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return ApiError(400, "invalid_request", message, param=where or None)


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "missing or wrong session token")
