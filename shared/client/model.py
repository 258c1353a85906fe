"""What the client hands out: transports, session events, positions, usage and answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

Transport: TypeAlias = Literal["ws", "sse"]
#: A session event as the gateway sends it: a JSON object with ``type``, ``epoch``, ``offset``.
EventDict: TypeAlias = dict[str, Any]
#: A place in a session's event stream: ``(epoch, offset)`` of the last event seen (any tuple;
#: ``shared.stream.position.Position`` is the one the gateway parses and formats).
Position: TypeAlias = tuple[str | None, int]

START: Position = (None, 0)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, value: object) -> Usage:
        if not isinstance(value, Mapping):
            return cls()
        return cls(
            prompt_tokens=int(value.get("prompt_tokens", 0)),
            completion_tokens=int(value.get("completion_tokens", 0)),
            total_tokens=int(value.get("total_tokens", 0)),
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished job: all its text, why it stopped (stop, length, cancelled) and its usage."""

    job_id: str
    text: str
    finish_reason: str
    usage: Usage
    model: str | None = None
