"""A session: a conversation the server remembers, its jobs and its event stream."""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from shared.client.answers import AnswerStream
from shared.client.links import _Link, _SseLink, _WsLink
from shared.client.model import START, EventDict, Position, Transport
from shared.client.resume import _EventStream

if TYPE_CHECKING:
    from shared.client.api import Client

#: Jobs whose pre-send position ``Session.stream`` remembers.
_REMEMBERED_JOBS = 1024


def new_idempotency_key() -> str:
    """A fresh random idempotency key: one per job submission, reused by its every retry."""
    return secrets.token_urlsafe(18)


def _job_body(
    content: str | None,
    messages: list[dict[str, str]] | None,
    prompt: str | None,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    given = sum(x is not None for x in (content, messages, prompt))
    if given != 1:
        raise TypeError("give exactly one of: a message text, messages=[...] or prompt=...")
    body: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = (
            messages if messages is not None else [{"role": "user", "content": content}]
        )
    return body


class Session:
    """One tokenbus session: a conversation the server remembers, and its event stream."""

    def __init__(
        self,
        client: Client,
        session_id: str,
        token: str,
        *,
        transport: Transport,
        position: Position = START,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.token = token
        self.transport: Transport = transport
        #: Connections this session's streams re-established after a drop.
        self.reconnects = 0
        self._epoch, self._offset = position
        self._sent: OrderedDict[str, Position] = OrderedDict()

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, transport={self.transport!r})"

    @property
    def position(self) -> Position:
        """``(epoch, offset)`` of the newest event any stream of this session delivered."""
        return self._epoch, self._offset

    async def send(
        self,
        content: str | None = None,
        /,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> str:
        """Enqueue a job; its id. ``content`` is a user message (the session remembers earlier
        turns); ``prompt=`` is a raw completion instead. ``params`` go into the job body as they
        are: max_tokens, temperature, top_p, seed, stop, model, memory, timeout_s, ...

        The request carries an idempotency key, a fresh random one unless ``idempotency_key``
        gives one: retries (the client's own, or yours with the same key and arguments, through
        any gateway, within a day) get the same job instead of a second one.
        """
        body = _job_body(content, messages, prompt, params)
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        return await self._submit(body, self.position, key)

    def ask(
        self,
        content: str | None = None,
        /,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> AnswerStream:
        """Send a job and follow its answer: ``async for text in chat.ask(...)`` yields its text
        as it comes; ``await chat.ask(...).text()`` waits for the whole Answer. Same arguments
        as ``send``; the stream's ``idempotency_key`` is the key its request carries.
        """
        return AnswerStream(
            self,
            body=_job_body(content, messages, prompt, params),
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key,
        )

    def stream(self, job_id: str) -> AnswerStream:
        """Follow a job sent earlier (by ``send``, or by anyone: then from the retained history)."""
        return AnswerStream(self, job_id=job_id, start=self._sent.get(job_id, START))

    async def cancel(self, job_id: str) -> str:
        """Ask the gateway to stop a job; its state (``cancelling``, or the one it ended in)."""
        reply = await self.client._request(
            "DELETE", f"{self._jobs_path}/{job_id}", token=self.token, idempotent=True
        )
        return str(reply.get("state", ""))

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job's record: state, attempts, worker, timestamps..."""
        return await self.client._request(
            "GET", f"{self._jobs_path}/{job_id}", token=self.token, idempotent=True
        )

    async def events(self, *, after: Position | None = None) -> AsyncIterator[EventDict]:
        """Every event of the session after ``after`` (default: this session's position; use
        ``(None, 0)`` for all the history the server keeps), forever, in order, once each.
        """
        stream = _EventStream(self, self.position if after is None else after)
        try:
            await stream.connect()
            while True:
                yield await stream.next()
        finally:
            await stream.close()

    @property
    def _jobs_path(self) -> str:
        return f"/v1/sessions/{self.session_id}/jobs"

    async def _submit(self, body: dict[str, Any], position: Position, key: str) -> str:
        reply = await self.client._request(
            "POST",
            self._jobs_path,
            token=self.token,
            json_body=body,
            idempotent=False,
            idempotency_key=key,
        )
        job_id = str(reply["job_id"])
        self._sent[job_id] = position
        while len(self._sent) > _REMEMBERED_JOBS:
            self._sent.popitem(last=False)
        return job_id

    def _observe(self, epoch: str | None, offset: int, *, resync: bool) -> None:
        if epoch == self._epoch:
            self._offset = max(self._offset, offset)
        elif resync or self._epoch is None:
            self._epoch, self._offset = epoch, offset

    async def _open_link(self, base: str, position: Position) -> _Link:
        """A link to the gateway at ``base`` (one of the client's), resuming after ``position``."""
        client = self.client
        http = client._http_session()
        if self.transport == "ws":
            async with asyncio.timeout(client.timeout_s):
                return await _WsLink.open(
                    http,
                    _ws_url(base) + "/v1/ws",
                    session_id=self.session_id,
                    token=self.token,
                    position=position,
                    heartbeat_s=client.idle_timeout_s / 3,
                )
        return await _SseLink.open(
            http,
            f"{base}/v1/sessions/{self.session_id}/events",
            token=self.token,
            position=position,
            connect_timeout_s=client.timeout_s,
            idle_timeout_s=client.idle_timeout_s,
        )


def _ws_url(base: str) -> str:
    return "ws" + base[4:] if base.startswith("http") else base
