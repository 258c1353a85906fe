"""Errors the client raises, and reading the gateway's error bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping

import aiohttp

from shared.client.model import EventDict

#: Failures that a new connection (or a retried request) may fix.
_TRANSIENT = (aiohttp.ClientError, OSError, TimeoutError)
#: The code of a 503 (and of an SSE notice) from a gateway that is shutting down: the request
#: was not handled, so it is safe to send again, to any gateway.
DRAINING = "draining"


class TokenbusError(Exception):
    """An error the gateway reported: an HTTP error response or an ``error`` event.

    ``status`` is the HTTP status (None for an event); ``job_id`` is set when a job failed.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        job_id: str | None = None,
    ) -> None:
        where = f"HTTP {status} " if status is not None else ""
        super().__init__(f"{where}{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.job_id = job_id


class ResyncError(TokenbusError):
    """The session's history no longer holds events this answer needs: its text has a gap."""

    def __init__(self, event: EventDict, job_id: str | None) -> None:
        self.reason = str(event.get("reason", "unknown"))
        super().__init__(
            "resync",
            f"session history lost ({self.reason}); the answer has a gap",
            job_id=job_id,
        )
        self.event = event


class ConnectionLostError(TokenbusError):
    """No connection to the gateway could be made within ``reconnect_timeout_s``."""

    def __init__(self, message: str) -> None:
        super().__init__("connection_lost", message)


class _Dropped(Exception):
    """The connection ended in a way that reconnecting and resuming fixes."""


class _Draining(_Dropped):
    """The gateway is draining and sent this client elsewhere: reconnect at once and resume."""


def _json_object(text: str | bytes) -> EventDict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _unauthorized(message: EventDict) -> TokenbusError:
    return TokenbusError(
        str(message.get("code", "unauthorized")),
        str(message.get("message", "missing or wrong session token")),
        status=401,
    )


async def _http_error(response: aiohttp.ClientResponse) -> TokenbusError:
    """The gateway's ``{"error": {...}}`` body (or whatever came) as a TokenbusError."""
    body = await response.read()
    error = (_json_object(body) or {}).get("error")
    if isinstance(error, Mapping):
        return TokenbusError(
            str(error.get("code") or f"http_{response.status}"),
            str(error.get("message") or response.reason or ""),
            status=response.status,
            type=error.get("type") if isinstance(error.get("type"), str) else None,
            param=error.get("param") if isinstance(error.get("param"), str) else None,
        )
    text = body.decode(errors="replace").strip()[:200]
    return TokenbusError(
        f"http_{response.status}", text or response.reason or "", status=response.status
    )


def _retryable_status(status: int) -> bool:
    """A status a gateway restarting behind a proxy, or a busy one, answers for a while."""
    return status in (429, 502, 503, 504)
