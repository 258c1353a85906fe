"""OpenAI's response objects and stream chunks, in its exact shapes, from a job's events.

One ``Reply`` per request fixes what every object of it repeats (id, created, model). Keys come
in OpenAI's order; ``system_fingerprint`` and ``logprobs`` are always null.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, TypeAlias

from shared.protocol import Job

JsonObject: TypeAlias = dict[str, Any]

#: Our finish reasons in OpenAI's words: it has no "cancelled", and a cancelled answer
#: stopped at the client's request.
FINISH: dict[str, str] = {"stop": "stop", "length": "length", "cancelled": "stop"}
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def frame(body: JsonObject) -> bytes:
    """One SSE event: a single ``data:`` line (compact JSON never holds a newline)."""
    return (
        b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    )


def usage_of(event: JsonObject) -> JsonObject:
    usage = event.get("usage") or {}
    return {k: int(usage.get(k, 0)) for k in _USAGE_KEYS}


@dataclass(frozen=True, slots=True)
class Kind:
    id_prefix: str
    object: str
    chunk_object: str
    chat: bool


CHAT = Kind("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Kind("cmpl-", "text_completion", "text_completion", chat=False)


@dataclass(frozen=True, slots=True)
class Reply:
    kind: Kind
    id: str
    model: str
    created: int
    include_usage: bool = False

    @classmethod
    def for_job(cls, kind: Kind, job: Job, model: str, *, include_usage: bool = False) -> Reply:
        job_part = job.id.removeprefix("job_")
        return cls(kind, kind.id_prefix + job_part, model, int(time.time()), include_usage)

    def _head(self, object_name: str) -> JsonObject:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def _choice(self, text: str | None, finish: str | None, *, role: bool = False) -> JsonObject:
        if not self.kind.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: JsonObject = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _chunk(self, choices: list[JsonObject], usage: JsonObject | None = None) -> JsonObject:
        body = self._head(self.kind.chunk_object) | {"choices": choices}
        if self.include_usage:  # OpenAI: null on every chunk but the last, which has it
            body["usage"] = usage
        return body

    def opening(self) -> JsonObject | None:
        """The chunk announcing the assistant's turn (chat only)."""
        return self._chunk([self._choice("", None, role=True)]) if self.kind.chat else None

    def delta(self, text: str) -> JsonObject:
        return self._chunk([self._choice(text, None)])

    def finish(self, reason: str) -> JsonObject:
        return self._chunk([self._choice(None, FINISH.get(reason, reason))])

    def usage(self, usage: JsonObject) -> JsonObject:
        return self._chunk([], usage)

    def whole(self, text: str, reason: str, usage: JsonObject) -> JsonObject:
        """The non-streaming response."""
        finish = FINISH.get(reason, reason)
        if self.kind.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = self._choice(text, finish)
        return self._head(self.kind.object) | {"choices": [choice], "usage": usage}
