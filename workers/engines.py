"""Engines by name: ``settings.engine`` picks one."""

from __future__ import annotations

from collections.abc import Callable

from shared.settings import Settings
from workers.engine import Engine
from workers.synthetic import SyntheticEngine
from workers.vllm_engine import VllmEngine

EngineFactory = Callable[[Settings], Engine]

ENGINES: dict[str, EngineFactory] = {
    "synthetic": SyntheticEngine,
    "vllm": VllmEngine,
}


def make_engine(settings: Settings) -> Engine:
    try:
        factory = ENGINES[settings.engine]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown engine {settings.engine!r}; known engines: {known}") from None
    return factory(settings)
