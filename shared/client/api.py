"""The entry point: ``Client``, its HTTP requests, and the gateways it may use."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiohttp

from shared.client.errors import (
    _TRANSIENT,
    DRAINING,
    ConnectionLostError,
    _Draining,
    _http_error,
    _json_object,
)
from shared.client.model import START, Position, Transport
from shared.client.session import Session

logger = logging.getLogger("tokenbus.client")

#: The HTTP header carrying a job request's idempotency key (gateway/intake.py).
IDEMPOTENCY_HEADER = "Idempotency-Key"


def _surely_unhandled(exc: BaseException) -> bool:
    """Whether a failed request surely never reached a gateway's handler: no connection was
    made, or a draining gateway refused it."""
    return isinstance(exc, (aiohttp.ClientConnectorError, _Draining))


class Client:
    """Entry point: ``async with Client(base_url) as client: chat = await client.session()``.

    ``base_url`` may be a list of gateways (any of them serves any session): requests and
    streams use one until it refuses, drops or drains them, then move on to the next.

    ``api_key`` is sent as a Bearer token when creating sessions (a gateway with API keys set
    needs one). Streams reconnect for up to ``reconnect_timeout_s`` after each drop, waiting
    ``backoff_s`` doubling to ``max_backoff_s`` between attempts; ``timeout_s`` bounds each
    request and connection attempt; a stream silent for ``idle_timeout_s`` counts as dropped.
    A job request whose outcome is unknown (its connection dropped or timed out after it was
    sent) is sent again with the same idempotency key, at most ``submit_retries`` times.
    Pass ``http`` to use an aiohttp session of your own (it is not closed here).
    """

    def __init__(
        self,
        base_url: str | Sequence[str] = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        transport: Transport = "ws",
        reconnect_timeout_s: float = 30.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        timeout_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        submit_retries: int = 3,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        if transport not in ("ws", "sse"):
            raise ValueError(f"transport must be 'ws' or 'sse', not {transport!r}")
        if submit_retries < 0:
            raise ValueError(f"submit_retries must be 0 or more, not {submit_retries}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("give at least one base URL")
        self.base_urls: tuple[str, ...] = tuple(url.rstrip("/") for url in urls)
        self._current = 0
        self.api_key = api_key
        self.transport: Transport = transport
        self.reconnect_timeout_s = reconnect_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.submit_retries = submit_retries
        self._http = http
        self._owns_http = http is None

    async def __aenter__(self) -> Client:
        self._http_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def session(
        self,
        session_id: str | None = None,
        token: str | None = None,
        *,
        transport: Transport | None = None,
        after: Position = START,
    ) -> Session:
        """A new session, or (with ``session_id`` and ``token``) one created before, whose
        streams start after ``after`` (default: all the history the server keeps).
        """
        transport = transport or self.transport
        if session_id is not None or token is not None:
            if not session_id or not token:
                raise TypeError("reopening a session needs both session_id and token")
            return Session(self, session_id, token, transport=transport, position=after)
        reply = await self._request("POST", "/v1/sessions", token=self.api_key, idempotent=True)
        return Session(self, str(reply["session_id"]), str(reply["token"]), transport=transport)

    @property
    def base_url(self) -> str:
        """The gateway that requests and new connections go to now."""
        return self.base_urls[self._current]

    def _move_on(self, failed: str) -> None:
        """``failed`` refused, dropped or drained a connection: use the next gateway, unless
        another stream (or request) already moved on from it."""
        if len(self.base_urls) > 1 and self.base_url == failed:
            self._current = (self._current + 1) % len(self.base_urls)
            logger.info("gateway %s failed or is draining; moving on to %s", failed, self.base_url)

    def _http_session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
            )
            self._owns_http = True
        return self._http

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        idempotent: bool,
        json_body: object = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """One JSON request. Retried, within ``reconnect_timeout_s``, when it surely was not
        handled (connection refused, a draining gateway's 503), or at all for an ``idempotent``
        one; on the next gateway at once when there is one not tried yet.

        A request with an ``idempotency_key`` (a job submission: the gateway makes one job of
        every request with that key) is sent with it each time, and is also retried when it may
        have been handled (the connection dropped or timed out after sending), up to
        ``submit_retries`` times.
        """
        http = self._http_session()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        repeatable = idempotent or idempotency_key is not None
        retryable: tuple[type[BaseException], ...] = (
            *(_TRANSIENT if repeatable else (aiohttp.ClientConnectorError,)),
            _Draining,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout_s
        backoff = self.backoff_s
        tried: set[str] = set()  # gateways that failed since the last wait
        unsure = 0  # attempts of a keyed request that may have been handled
        while True:
            base = self.base_url
            tried.add(base)
            try:
                async with http.request(
                    method,
                    base + path,
                    json=json_body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as response:
                    if response.status >= 400:
                        error = await _http_error(response)
                        if response.status == 503 and error.code == DRAINING:
                            raise _Draining(str(error))
                        raise error
                    reply = _json_object(await response.read())
                    return reply if reply is not None else {}
            except retryable as exc:
                if idempotency_key is not None and not _surely_unhandled(exc):
                    unsure += 1
                    if unsure > self.submit_retries:
                        raise ConnectionLostError(
                            f"{method} {path} failed {unsure} times, its outcome unknown "
                            f"(idempotency key {idempotency_key!r}): {exc!r}"
                        ) from exc
                self._move_on(base)
                if self.base_url not in tried:
                    logger.debug("%s %s failed (%r); trying %s", method, path, exc, self.base_url)
                    continue
                tried.clear()
                if loop.time() + backoff > deadline:
                    raise ConnectionLostError(
                        f"{method} {path} failed for {self.reconnect_timeout_s:g} s: {exc!r}"
                    ) from exc
                logger.debug("%s %s failed (%r); retrying", method, path, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
