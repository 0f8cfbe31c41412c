"""Model code of the engine: Mistral / Llama, Mixtral and Mistral 4 over a paged KV cache.

``load_model`` builds one from a Hugging Face folder or a .gguf file;
``resolve_architecture`` picks the class for a config.json. Imports are lazy.
"""

from __future__ import annotations

_EXPORTS = {
    "CausalLM": "engine.models.base",
    "KVCacheSpec": "engine.models.base",
    "ModelLoadError": "engine.models.base",
    "resolve_architecture": "engine.models.registry",
    "load_model": "engine.models.loader",
    "default_model_path": "engine.models.loader",
    "make_tiny": "engine.models.tiny",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.models' has no attribute {name!r}")
