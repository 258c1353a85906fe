"""Request bodies the gateway accepts, and their translation into jobs."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.protocol import (
    ChatMessage,
    DisconnectPolicy,
    Job,
    Penalty,
    SamplingParams,
    Seed,
    Stops,
    Temperature,
    Text,
    TopP,
)


class PromptRequest(BaseModel):
    """Body of ``POST /v1/sessions/{id}/jobs`` and of a WebSocket ``prompt`` message."""

    # NaN/infinity: a timeout_s of inf would make a job that never expires.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["prompt"] | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    model: Text | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stops = Field(default_factory=list)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    memory: bool = True
    on_disconnect: DisconnectPolicy = "continue"
    timeout_s: float | None = Field(None, gt=0, description="Drop the job if not started by then.")
    idempotency_key: str | None = Field(
        None,
        description="A repeat of this request with the same key on the same session gets the "
        "same job instead of a new one (over HTTP the Idempotency-Key header says the same).",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    def to_job(self, session_id: str, model: str) -> Job:
        """Raises pydantic's ValidationError when the job would be invalid (e.g. no prompt)."""
        return Job(
            session_id=session_id,
            model=model,
            prompt=self.prompt,
            messages=self.messages,
            sampling=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                stop=self.stop,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
            ),
            max_tokens=self.max_tokens,
            on_disconnect=self.on_disconnect,
            memory=self.memory,
            deadline=time.time() + self.timeout_s if self.timeout_s else None,
        )
