"""The wire protocol: jobs (version 1) and the events a session carries.

Events are published without ``epoch``/``offset``; the publish script stamps both, so every
event read from a channel or a history stream has them.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

JOB_SCHEMA_VERSION: Literal[1] = 1

Role: TypeAlias = Literal["system", "user", "assistant", "tool"]
DisconnectPolicy: TypeAlias = Literal["cancel", "continue"]
FinishReason: TypeAlias = Literal["stop", "length", "cancelled"]


def new_id(prefix: str = "") -> str:
    """Unguessable id (128 random bits)."""
    return prefix + secrets.token_urlsafe(16)


def has_lone_surrogate(value: str) -> bool:
    """True when ``value`` holds a UTF-16 surrogate on its own (JSON's ``"\\ud800"``).

    Python strings can hold one, but no UTF-8 can: Redis, the tokenizer and every client would
    fail on it later, far from the field that carried it.
    """
    if value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def _encodable(value: str) -> str:
    if has_lone_surrogate(value):
        raise ValueError("text holds a lone UTF-16 surrogate (such as \\ud800); send valid Unicode")
    return value


#: A string that can be encoded as UTF-8: every text field of the protocol and of requests.
Text: TypeAlias = Annotated[str, AfterValidator(_encodable)]


class _Model(BaseModel):
    # NaN and infinity have no JSON form and compare false with every bound: refused at the door.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ChatMessage(_Model):
    role: Role
    content: Text


# Sampling fields' bounds, shared by the job and every request body that carries them.
Temperature: TypeAlias = Annotated[float, Field(ge=0.0, le=2.0)]
TopP: TypeAlias = Annotated[float, Field(gt=0.0, le=1.0)]
# What torch's generators accept: a seed outside it would fail inside the engine.
Seed: TypeAlias = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
Penalty: TypeAlias = Annotated[float, Field(ge=-2.0, le=2.0)]
StopString: TypeAlias = Annotated[Text, Field(min_length=1, max_length=1024)]
Stops: TypeAlias = Annotated[list[StopString], Field(max_length=16)]


class SamplingParams(_Model):
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stops = Field(default_factory=list)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0


class Job(_Model):
    """A prompt job, as written to a model's jobs stream (JSON or msgpack)."""

    v: Literal[1] = JOB_SCHEMA_VERSION
    id: Text = Field(default_factory=lambda: new_id("job_"), min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-.:]+$")
    model: Text | None = Field(None, max_length=256)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    max_tokens: int | None = Field(None, ge=1)
    on_disconnect: DisconnectPolicy = "continue"
    memory: bool = Field(
        True,
        description="Chat jobs (messages): answer with the session's earlier exchanges as "
        "context, and add this one to them when it ends. Ignored for prompt jobs.",
    )
    deadline: float | None = Field(None, description="Unix time after which the job is dropped.")
    attempt: int = Field(0, ge=0)
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _one_input(self) -> Job:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a job has exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty")
        return self

    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.content) for m in self.messages or ())


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Event(_Model):
    # Present on every event read back from Redis; absent before publishing.
    epoch: str | None = None
    offset: int | None = None


class StreamStart(_Event):
    type: Literal["stream_start"] = "stream_start"
    job_id: str
    model: str
    attempt: int = 0
    created_at: float | None = Field(
        None, description="Unix time the job was created (its created_at), for time to first token."
    )


class Delta(_Event):
    type: Literal["delta"] = "delta"
    job_id: str
    delta: str
    tokens: int = Field(1, description="Tokens coalesced into this delta.")
    t: float = Field(description="Unix time the engine emitted the last token of this delta.")


class StreamEnd(_Event):
    type: Literal["stream_end"] = "stream_end"
    job_id: str
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)


class Error(_Event):
    """Terminal for its job when ``job_id`` is set; otherwise about the connection."""

    type: Literal["error"] = "error"
    code: str
    message: str
    job_id: str | None = None


class Resync(_Event):
    """Delivery could not continue from the client's position; it restarts at ``offset``+1."""

    type: Literal["resync"] = "resync"
    reason: Literal["epoch_changed", "history_trimmed", "history_expired", "offset_ahead"]


Event: TypeAlias = Annotated[
    StreamStart | Delta | StreamEnd | Error | Resync, Field(discriminator="type")
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
TERMINAL_TYPES = frozenset({"stream_end", "error"})

#: A decoded event as it travels through the gateway (plain JSON object).
EventDict: TypeAlias = dict[str, Any]


def job_json_schema() -> dict[str, Any]:
    schema = Job.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://tokenbus.dev/schema/job-v{JOB_SCHEMA_VERSION}.json"
    return schema
