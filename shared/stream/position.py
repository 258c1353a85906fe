"""Where an event is in its session's stream: the position type and the history entry's field.

Every published event is JSON that starts with its position: publish.lua writes
``{"epoch":"<epoch>","offset":<offset>,`` in front of the event's own fields. Reading that
prefix by hand was measured slower in Python (2.3 µs an event) than decoding the whole event
with orjson (0.8 µs), so readers decode (``shared.codec.decode_event``) rather than peek.
Stdlib only: the client imports it too.
"""

from __future__ import annotations

from typing import NamedTuple

#: The field of a history stream entry that holds the event's JSON.
HISTORY_FIELD = "e"
#: Largest offset a client may name: offsets are the first half of Redis stream ids (64 bits).
MAX_OFFSET = 2**63 - 1


class BadPosition(ValueError):
    """Text that is not a stream position."""


class Position(NamedTuple):
    """The last event seen: ``epoch`` (None before any) and its ``offset`` (0 before any)."""

    epoch: str | None = None
    offset: int = 0

    @classmethod
    def parse(cls, value: str) -> Position:
        """``"<epoch>:<offset>"`` or a bare ``"<offset>"`` (any epoch), as SSE ids are."""
        epoch, _, offset = value.strip().rpartition(":")
        # isdigit() alone passes "²" and other digits int() refuses.
        if not (offset.isascii() and offset.isdigit() and len(offset) <= 20) or (
            int(offset) > MAX_OFFSET
        ):
            raise BadPosition(f"not a stream position: {value[:64]!r}")
        return cls(epoch or None, int(offset))

    def format(self) -> str:
        return f"{self.epoch}:{self.offset}" if self.epoch else str(self.offset)

    def has(self, epoch: str, offset: int) -> bool:
        """The event at (``epoch``, ``offset``) was delivered already from here."""
        return self.epoch == epoch and offset <= self.offset

    def next_is(self, epoch: str, offset: int) -> bool:
        """(``epoch``, ``offset``) is the very next event: deliver it, nothing is missing."""
        return offset == self.offset + 1 and self.epoch in (None, epoch)
