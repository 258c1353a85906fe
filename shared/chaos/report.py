"""Counting what each stream received against what it should have, and the table of it."""

from __future__ import annotations

import difflib
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from shared.chaos.follow import Stream

_TOKEN = re.compile(r" ?[^ ]+")


@dataclass(frozen=True)
class Counts:
    completed: bool
    lost: int  # expected tokens never received
    duplicated: int  # tokens received more than once, or events delivered twice
    restarted: bool  # a second stream_start: the answer began again
    stuck: bool  # no terminal event by the deadline


def count(s: Stream) -> Counts:
    text = "".join(str(e.get("delta", "")) for e in s.events if e.get("type") == "delta")
    got = _TOKEN.findall(text)
    matcher = difflib.SequenceMatcher(None, s.expected, got, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    starts = sum(e.get("type") == "stream_start" for e in s.events)
    ends = [e for e in s.events if e.get("type") == "stream_end"]
    lost = len(s.expected) - matched
    duplicated = len(got) - matched + s.duplicate_events
    completed = bool(ends) and lost == 0 and duplicated == 0 and starts == 1
    return Counts(completed, lost, duplicated, starts > 1, not s.ended)


@dataclass
class Row:
    scenario: str
    streams: int
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    restarted: int = 0
    stuck: int = 0
    resyncs: int = 0
    reconnects: int = 0
    takeover_p50_s: float | None = None
    takeover_p99_s: float | None = None
    exits_ok: bool = True  # every signalled process exited as it should (0 after SIGTERM)
    # Where the fault may lose data (a failover to an asynchronous replica), a stream may end
    # damaged if it was told (a resync or an error event); silent counts the others.
    resync_ok: bool = False
    silent: int = 0
    note: str = ""

    def add(self, s: Stream) -> None:
        c = count(s)
        self.completed += c.completed
        self.lost += c.lost
        self.duplicated += c.duplicated
        self.restarted += c.restarted
        self.stuck += c.stuck
        self.resyncs += s.resyncs
        self.reconnects += s.reconnects
        damaged = not c.completed and not c.stuck
        told = s.resyncs > 0 or any(e.get("type") == "error" for e in s.events)
        self.silent += damaged and not told

    def takeovers(self, seconds: list[float]) -> None:
        if seconds:
            ordered = sorted(seconds)
            self.takeover_p50_s = round(statistics.median(ordered), 2)
            self.takeover_p99_s = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2)

    @property
    def ok(self) -> bool:
        if self.resync_ok:
            return self.stuck == 0 and self.silent == 0 and self.exits_ok
        bad = self.lost + self.duplicated + self.restarted + self.stuck
        return bad == 0 and self.completed == self.streams and self.exits_ok

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


_COLUMNS = (
    ("scenario", 16),
    ("streams", 7),
    ("completed", 9),
    ("lost", 4),
    ("duplicated", 10),
    ("restarted", 9),
    ("stuck", 5),
    ("resyncs", 7),
    ("reconnects", 10),
    ("takeover p50/p99 s", 18),
    ("ok", 3),
)


def table(rows: list[Row]) -> str:
    head = "  ".join(name.ljust(width) for name, width in _COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        takeover = f"{r.takeover_p50_s}/{r.takeover_p99_s}" if r.takeover_p50_s is not None else "-"
        cells = [
            r.scenario, r.streams, r.completed, r.lost, r.duplicated, r.restarted, r.stuck,
            r.resyncs, r.reconnects, takeover, "yes" if r.ok else "NO",
        ]  # fmt: skip
        lines.append("  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)))
        if r.resync_ok:
            lines.append(f"    streams damaged without a resync or error: {r.silent}")
        if r.note:
            lines.append(f"    {r.note}")
    return "\n".join(lines)
