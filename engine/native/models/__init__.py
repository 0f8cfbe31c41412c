"""The native engine's model code: Mistral / Llama, Mixtral and Mistral 4 over a paged KV cache.

``load_model`` builds one from a checkpoint (``engine.checkpoint`` finds and
reads it); ``resolve_architecture`` picks the class for a config.json. Imports are lazy.
"""

from __future__ import annotations

from engine._lazy import lazy_getattr

_EXPORTS = {
    "CausalLM": "engine.native.models.base",
    "KVCacheSpec": "engine.native.models.base",
    "resolve_architecture": "engine.native.models.registry",
    "load_model": "engine.native.models.loader",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
