"""Levante's paged-attention engine for Mistral-family models.

Imports are lazy so that ``engine.core``, ``engine.types`` and ``engine.api``
(torch-free) can be used without loading torch.
"""

from __future__ import annotations

from engine._lazy import lazy_getattr

_EXPORTS = {
    "LLM": "engine.llm",
    "AsyncEngine": "engine.native.async_engine",
    "EngineCore": "engine.native.engine_core",
    "SamplingParams": "engine.core.request",
    "EngineClient": "engine.types",
    "RequestOutput": "engine.types",
    "RequestDelta": "engine.types",
    "EngineStats": "engine.types",
    "EngineError": "engine.types",
    "create_engine": "engine.api",
    "EngineConfig": "engine.config",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
