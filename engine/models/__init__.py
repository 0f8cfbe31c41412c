"""Model code of the engine: Mistral / Llama, Mixtral and Mistral 4 over a paged KV cache.

``load_model`` builds one from a Hugging Face folder or a .gguf file;
``resolve_architecture`` picks the class for a config.json. Imports are lazy.
"""

from __future__ import annotations

from engine._lazy import lazy_getattr

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
__getattr__ = lazy_getattr(__name__, _EXPORTS)
