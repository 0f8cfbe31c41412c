"""Checkpoints on disk, as both engines read them: where a model is, its config, its files.

``folder.resolve_model_dir`` turns a model path, ``.gguf`` file (``gguf``) or
``tiny:`` URI (``uris``, ``tiny``) into a Hugging Face folder, built once in
the cache (``cache``); ``folder.read_config`` and ``formats`` read what it
holds, whatever its layout. The native engine loads the weights from here
(``engine.native.models.loader``); the vLLM backend only needs the folder and
its config. Imports are lazy.
"""

from __future__ import annotations

from engine._lazy import lazy_getattr

_EXPORTS = {
    "ModelLoadError": "engine.checkpoint.files",
    "read_config": "engine.checkpoint.folder",
    "resolve_model_dir": "engine.checkpoint.folder",
    "default_model_path": "engine.checkpoint.gguf",
    "make_tiny": "engine.checkpoint.tiny",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
