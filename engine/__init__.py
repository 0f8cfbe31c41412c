"""Levante's paged-attention engine for Mistral-family models.

Imports are lazy so that ``engine.core`` (torch-free) and ``engine.api`` can
be used without loading torch.
"""

from __future__ import annotations

_EXPORTS = {
    "LLM": "engine.llm",
    "AsyncEngine": "engine.async_engine",
    "EngineCore": "engine.llm_engine",
    "SamplingParams": "engine.core.request",
    "EngineClient": "engine.api",
    "RequestOutput": "engine.api",
    "RequestDelta": "engine.api",
    "EngineStats": "engine.api",
    "EngineError": "engine.api",
    "EngineConfig": "engine.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
