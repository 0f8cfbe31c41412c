"""Model names a config may give instead of a path.

``tiny:<arch>`` or ``tiny:<arch>?seed=0&vocab_size=32768``: a random tiny
checkpoint (``engine.checkpoint.tiny``), built once into the model cache under
a name that hashes everything it depends on, so each rank of a group (or a
later run) finds the same weights. (Tokenizer names, ``mistral-common:<file>``,
are ``engine.tokenizer``'s.)

Parsing does no heavy imports; torch and transformers load only to build.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from urllib.parse import parse_qsl

from engine.checkpoint.cache import build_once, cache_root
from engine.checkpoint.files import ModelLoadError

TINY_SCHEME = "tiny:"


def is_tiny_uri(name: str) -> bool:
    return name.startswith(TINY_SCHEME)


def _scalar(text: str) -> int | float | bool | None | str:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)


def parse_tiny_uri(uri: str) -> tuple[str, int, dict]:
    """``tiny:<arch>?k=v&...`` -> (arch, seed, config overrides); ModelLoadError naming what is wrong."""
    from engine.checkpoint.tiny import ARCHS, tiny_config

    arch, _, query = uri[len(TINY_SCHEME) :].partition("?")
    if arch not in ARCHS:
        raise ModelLoadError(f"model {uri!r}: unknown tiny architecture {arch!r} (choices: {', '.join(ARCHS)})")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as e:
        raise ModelLoadError(f"model {uri!r}: bad query string: {e}") from None
    defaults = tiny_config(arch)
    seed, overrides = 0, {}
    for key, text in pairs:
        value = _scalar(text)
        if key == "seed":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ModelLoadError(f"model {uri!r}: seed must be an integer, got {text!r}")
            seed = value
        elif key in defaults and not isinstance(defaults[key], (dict, list)):
            overrides[key] = value
        else:
            settable = sorted(k for k, v in defaults.items() if not isinstance(v, (dict, list)))
            raise ModelLoadError(
                f"model {uri!r}: {key!r} cannot be set for tiny {arch} (settable: seed, {', '.join(settable)})"
            )
    return arch, seed, overrides


def tiny_model_dir(uri: str) -> Path:
    """The cached folder of a ``tiny:`` URI, built on first use (atomically, so ranks may race)."""
    from engine.checkpoint.tiny import tiny_config

    arch, seed, overrides = parse_tiny_uri(uri)
    # Everything the weights depend on: the full config (defaults may change), the seed, and
    # the transformers release whose initializers draw them.
    key = json.dumps(
        {
            "arch": arch,
            "seed": seed,
            "config": tiny_config(arch, **overrides),
            "transformers": importlib.metadata.version("transformers"),
        },
        sort_keys=True,
    )
    final = cache_root() / "models" / f"tiny-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        from engine.checkpoint.tiny import make_tiny

        make_tiny(arch, seed, str(tmp), **overrides)

    def is_complete(folder: Path) -> bool:
        return (folder / "config.json").is_file() and any(
            (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
        )

    return build_once(final, build, is_complete, f"building {uri!r}")
