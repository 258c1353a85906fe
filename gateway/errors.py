"""Errors the gateway answers with: one shape for HTTP (OpenAI's) and for WS/SSE events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from shared.codec import BadJson, parse_json, utf8_safe

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
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        *,
        close: bool = False,
    ) -> None:
        # Messages quote what the client sent; they must stay writable as UTF-8 (a WS frame).
        message = utf8_safe(message)
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = utf8_safe(param) if param is not None else None
        #: Close the connection after answering: the rest of the request cannot be read.
        self.close = close

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
        response = web.json_response(self.body(), status=self.status, headers=headers)
        if self.close:
            response.force_close()
        return response


async def json_body(request: web.Request) -> object:
    """A request's JSON body (``{}`` when it has none), or the error that says what is wrong."""
    if not request.can_read_body:
        return {}
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's own error is plain text
        raise ApiError(
            413, "request_too_large", f"body is over {request.client_max_size} bytes"
        ) from exc
    except RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on a body that is not
        # Nothing more can be read from this request: end it here, so aiohttp does not try to
        # drain it (and log the same error again), and close the connection after the answer.
        request.content.feed_eof()
        encoding = request.headers.get("Content-Encoding", "")
        raise ApiError(
            400,
            "bad_encoding",
            f"body could not be decoded as Content-Encoding {encoding!r}",
            close=True,
        ) from exc
    charset = request.charset or "utf-8"
    try:
        body = raw.decode(charset)
    except LookupError as exc:  # no such codec, or one that is not a text encoding
        raise ApiError(400, "bad_encoding", f"unknown charset {charset!r}: send UTF-8") from exc
    except ValueError as exc:  # UnicodeDecodeError, and codecs that refuse input their own way
        raise ApiError(400, "bad_encoding", f"body is not valid {charset!r} text: {exc}") from exc
    try:
        return parse_json(body)
    except BadJson as exc:
        raise ApiError(400, "bad_json", f"body is not JSON: {exc}") from exc


@web.middleware
async def undecodable_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read what a handler left unread of a body with a Content-Encoding, before answering.

    Otherwise aiohttp drains it after the answer and, when it turns out not to decode (``gzip``
    on a body that is not), logs the client's mistake as an unhandled server error. Bodies
    without an encoding cannot fail that way and are left to aiohttp.
    """
    response = await handler(request)
    if request.headers.get("Content-Encoding") and not request.content.is_eof():
        try:
            await request.read()
        except (RequestPayloadError, web.HTTPRequestEntityTooLarge):
            request.content.feed_eof()
            response.force_close()
    return response


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
