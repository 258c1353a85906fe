"""Which of a session's earlier exchanges go in front of a chat job: the latest that fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared.conversation import Exchange, turns
from shared.protocol import ChatMessage, Job

#: A prompt rendered for the model: its length is its size in tokens.
R = TypeVar("R", bound=Sized)


@dataclass(frozen=True, slots=True)
class Fitted(Generic[R]):
    prompt: R  # kept history, then the job's own messages, rendered
    kept: int  # exchanges of history kept
    dropped: int  # oldest exchanges left out


def wanted_tokens(job: Job, default_max_tokens: int) -> int:
    """The answer length a job asks for: its max_tokens, else the default."""
    return job.max_tokens if job.max_tokens is not None else default_max_tokens


def history_budget(job: Job, max_model_len: int, default_max_tokens: int) -> int:
    """Tokens the prompt with history may take: the context less room for the answer.

    The room is the job's max_tokens, but at most half the context, so a long answer asked
    for never leaves no room for history at all.
    """
    wanted = wanted_tokens(job, default_max_tokens)
    return max_model_len - max(1, min(wanted, max_model_len // 2))


def fit(
    job: Job,
    history: Sequence[Exchange],
    render: Callable[[list[ChatMessage]], R],
    budget: int,
) -> Fitted[R]:
    """The job's messages after the most recent exchanges whose prompt fits in ``budget`` tokens.

    Oldest exchanges go first, whole (never half an exchange). When even the job's own messages
    do not fit, none of the history is kept and the engine's own length check refuses the job.
    """
    own = list(job.messages or ())
    history = [e for e in history if e.job_id != job.id]

    rendered: dict[int, R] = {}

    def size(drop: int) -> int:
        if drop not in rendered:
            rendered[drop] = render(turns(history[drop:]) + own)
        return len(rendered[drop])

    # Fewer exchanges never render longer, so the smallest drop that fits is a binary search.
    low, high = 0, len(history)
    if history and size(0) > budget:
        while low < high:
            mid = (low + high) // 2
            if size(mid) <= budget:
                high = mid
            else:
                low = mid + 1
    size(low)
    return Fitted(rendered[low], len(history) - low, low)
