"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions``, and their jobs.

Fields other vendors add are ignored (clients send them). Features we do not serve are refused
with a 400 naming the parameter, never dropped quietly: a client asking for tools or logprobs
must not get an answer that silently lacks them.
"""

from __future__ import annotations

from typing import Any, Literal, NoReturn, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import ApiError, validated
from gateway.requests import PromptRequest
from shared.protocol import Penalty, Temperature, TopP

Role: TypeAlias = Literal["system", "developer", "user", "assistant", "tool"]
#: OpenAI's newer name for the system role.
_ROLES: dict[str, str] = {"developer": "system"}
#: Completions' max_tokens when a request names none (OpenAI's default; vLLM follows it).
COMPLETIONS_MAX_TOKENS = 16


def refuse(param: str, message: str, code: str = "unsupported_parameter") -> NoReturn:
    raise ApiError(400, code, message, param=param)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Role
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None


class _Common(_Body):
    """What both routes take. ``None`` everywhere: clients send explicit nulls for defaults."""

    model: str | None = Field(None, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if self.n not in (None, 1):
            refuse(
                "n",
                f"only n=1 is supported (got {self.n}): send one request per choice",
                "unsupported_value",
            )
        if self.stream_options is not None and not self.stream:
            refuse(
                "stream_options",
                "stream_options is only allowed when stream is true",
                "invalid_request",
            )
        if self.logit_bias:
            refuse("logit_bias", "logit_bias is not supported")

    def _prompt(self, max_tokens: int | None, **job: Any) -> PromptRequest:
        fields = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return validated(
            PromptRequest,
            {
                **{k: v for k, v in fields.items() if v is not None},
                **job,
                # The request carries the whole conversation; the session is its own.
                "memory": False,
                # Nobody else reads the answer: a client that leaves ends the job.
                "on_disconnect": "cancel",
            },
        )


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def to_prompt(self) -> PromptRequest:
        self._check_common()
        if self.logprobs:
            refuse("logprobs", "logprobs are not supported")
        if self.top_logprobs:
            refuse("top_logprobs", "top_logprobs is not supported")
        for name in ("tools", "functions"):
            if getattr(self, name):
                refuse(name, f"{name} (function calling) is not supported")
        # Without tools, "auto" means what "none" does: answer in text.
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                refuse(
                    name, f"{name} is not supported: no tools can be called", "unsupported_value"
                )
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            refuse(
                "response_format",
                f"response_format {kind!r} is not supported; only 'text'",
                "unsupported_value",
            )
        messages = [_message(i, m) for i, m in enumerate(self.messages)]
        # vLLM's precedence: the newer name wins when both are given.
        return self._prompt(self.max_completion_tokens or self.max_tokens, messages=messages)


def _message(i: int, message: Message) -> dict[str, str]:
    if message.tool_calls:
        refuse(f"messages.{i}.tool_calls", "tool calls are not supported")
    content = message.content
    if content is None:
        if message.role != "assistant":
            refuse(
                f"messages.{i}.content",
                f"a {message.role} message needs content",
                "invalid_request",
            )
        content = ""
    elif not isinstance(content, str):
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                refuse(
                    f"messages.{i}.content.{j}.type",
                    f"content parts of type {part.type!r} are not supported; only 'text'",
                    "unsupported_value",
                )
        # vLLM joins text parts with newlines.
        content = "\n".join(part.text or "" for part in content)
    return {"role": _ROLES.get(message.role, message.role), "content": content}


class CompletionRequest(_Common):
    prompt: str | list[Any]
    max_tokens: int | None = Field(COMPLETIONS_MAX_TOKENS, ge=1)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def to_prompt(self) -> PromptRequest:
        self._check_common()
        if self.echo:
            refuse("echo", "echo is not supported")
        if self.suffix:
            refuse("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            refuse("best_of", "only best_of=1 is supported", "unsupported_value")
        if self.logprobs is not None:
            refuse("logprobs", "logprobs are not supported")
        return self._prompt(self.max_tokens, prompt=_one_prompt(self.prompt))


def _one_prompt(prompt: str | list[Any]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(p, str) for p in prompt):
        refuse(
            "prompt",
            "send one prompt per request (a list of several is not supported)",
            "unsupported_value",
        )
    if prompt and all(isinstance(p, int | list) for p in prompt):
        refuse("prompt", "token-id prompts are not supported: send text", "unsupported_value")
    refuse("prompt", "prompt must be a string or a list holding one string", "invalid_request")
