"""A model's folder: where it is and what it holds.

``resolve_model_dir`` turns whatever a config names (a Hugging Face folder, a
``.gguf`` file, a ``tiny:<arch>`` URI, or nothing: the embedded default) into
a Hugging Face folder, converting or building it once into the cache
(``$LEVANTE_CACHE_DIR``, default ``~/.cache/levante``, under ``models/``).
``read_config`` gives its text model's config dict and ``weight_files`` its
safetensors files, whatever the layout (``engine.checkpoint.formats``). Both
engines read a model through here; only the native one loads its weights.

Every failure is a :class:`ModelLoadError` whose message is one line naming
the file at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.checkpoint.files import ModelLoadError, read_json_object
from engine.checkpoint.formats import format_weight_files, native_config, text_model_config
from engine.checkpoint.gguf import convert_gguf, default_model_path
from engine.checkpoint.uris import is_tiny_uri, tiny_model_dir


def read_config(folder: Path) -> dict:
    """The (text) model's config dict: config.json, unwrapped for Mistral3 folders, or params.json mapped."""
    native = native_config(folder)
    if native is not None:
        return native
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in model folder {folder}")
    return text_model_config(read_json_object(path), path)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, else model.safetensors, else *.safetensors
    (consolidated*.safetensors in a Mistral-native folder)."""
    native = format_weight_files(folder)
    if native is not None:
        return native
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read the weight map of {index}: {e!r}") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"weight shard {file.name} listed in {index.name} is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if files:
        return files
    if list(folder.glob("consolidated*.safetensors")):
        raise ModelLoadError(f"{folder} has Mistral-native consolidated*.safetensors but no params.json")
    if list(folder.glob("*.bin")):
        raise ModelLoadError(f"{folder} has PyTorch .bin weights; only safetensors are supported")
    raise ModelLoadError(f"no weights (model.safetensors) in model folder {folder}")


def resolve_model_dir(model_path: str | os.PathLike | None) -> str:
    """The Hugging Face folder behind a model path (where its tokenizer lives too):
    the folder itself, the cached conversion of a ``.gguf`` (converting it once),
    the cached build of a ``tiny:<arch>`` URI, or the default model's folder for None."""
    if model_path is None:
        return default_model_path()
    if is_tiny_uri(str(model_path)):
        return str(tiny_model_dir(str(model_path)))
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        return str(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    raise ModelLoadError(f"model path {path} is neither a model folder nor a .gguf file")
