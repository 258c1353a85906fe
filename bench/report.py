"""What a bench scenario hands back: a titled table for people and rows for ``--json``."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One scenario's result: ``table`` is printed, ``rows`` go to ``--json``."""

    title: str
    table: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool = True  # False: the scenario could not run or lost/duplicated something

    def text(self) -> str:
        lines = [f"## {self.title}", "", self.table]
        lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"


def grid(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width table, numbers right-aligned."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for n, r in enumerate(cells):
        out.append(
            "  ".join(
                c.rjust(w) if n and _numeric(c) else c.ljust(w)
                for c, w in zip(r, widths, strict=True)
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).replace("x", "").isdigit()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    """``a / b``; nan when ``b`` is 0 (nothing to compare against)."""
    return a / b if b else float("nan")
