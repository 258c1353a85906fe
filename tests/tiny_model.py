"""The tiny random test model: built by ``bench.tiny_model`` (the bench uses it too)."""

from __future__ import annotations

from bench.tiny_model import CONTEXT, SPECIALS, build_tiny_model

__all__ = ["CONTEXT", "SPECIALS", "build_tiny_model"]
