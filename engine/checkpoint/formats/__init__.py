"""Checkpoint formats other than a plain Hugging Face folder, and the one tensor reader for all.

``engine.checkpoint.folder`` and the native loader ask three things of a folder: its config dict
(:func:`native_config`, else config.json through :func:`text_model_config`),
its weight files (:func:`format_weight_files`) and its tensors under Hugging
Face text-model names (:func:`read_tensors`).
The format is recorded in the config dict as ``levante_format``:

- ``mistral3``: a ``Mistral3ForConditionalGeneration`` folder, text model only (``mistral3.py``);
- ``consolidated``: Mistral's native ``params.json`` + ``consolidated*.safetensors`` (``consolidated.py``);
- absent: a Hugging Face causal-LM folder.

Any of them may hold FP8 block-scaled weights (``fp8.py``), dequantized to the
model's dtype as they are read, so ``load_weights`` sees plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from engine.checkpoint.files import ModelLoadError
from engine.checkpoint.formats import consolidated, fp8, mistral3

__all__ = ["format_weight_files", "native_config", "read_tensors", "text_model_config"]


class WeightSink(Protocol):
    """What the tensor reader asks of the model it reads for (a native ``CausalLM``)."""

    def is_weight_needed(self, name: str) -> bool: ...


def native_config(folder: Path) -> dict | None:
    """The config dict of a Mistral-native folder (from params.json); None for any other folder."""
    return consolidated.read_params(folder) if consolidated.is_consolidated(folder) else None


def text_model_config(hf: dict, path: Path) -> dict:
    """The text model's config dict from a config.json dict (``path``, for errors): unwrapped for Mistral3."""
    return mistral3.text_config(hf, path) if mistral3.is_mistral3(hf) else hf


def format_weight_files(folder: Path) -> list[Path] | None:
    """The weight files of a native folder; None for the Hugging Face layouts."""
    return consolidated.weight_files(folder) if consolidated.is_consolidated(folder) else None


def _renamer(hf: dict) -> Callable[[str], str | None]:
    fmt = hf.get("levante_format")
    if fmt == mistral3.FORMAT:
        return mistral3.text_name
    if fmt == consolidated.FORMAT:
        return consolidated.hf_name
    return lambda name: name


def _transform(hf: dict) -> Callable[[str, Tensor], Tensor]:
    if hf.get("levante_format") == consolidated.FORMAT:
        return consolidated.qk_permuter(hf)
    return lambda name, t: t


class _Shards:
    """safetensors handles of every file, and which one holds each tensor (a scale may sit in another shard)."""

    def __init__(self, files: list[Path], stack: ExitStack):
        from safetensors import SafetensorError, safe_open

        self.handles = {}
        self.where: dict[str, Path] = {}
        for file in files:
            try:
                self.handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            except SafetensorError as e:
                raise ModelLoadError(f"cannot read weights file {file}: {e}") from None
            self.where.update(dict.fromkeys(self.handles[file].keys(), file))

    def get(self, name: str) -> Tensor | None:
        file = self.where.get(name)
        return None if file is None else self.handles[file].get_tensor(name)


def _dequantized(raw: str, t: Tensor, shards: _Shards, scheme: fp8.Fp8Scheme | None, dtype: torch.dtype) -> Tensor:
    if scheme is None:
        raise ModelLoadError(f"tensor {raw!r} is stored as {t.dtype}, but config.json has no fp8 quantization_config")
    scale = shards.get(raw + fp8.SCALE_SUFFIX)
    if scale is None:
        raise ModelLoadError(
            f"tensor {raw!r} is {t.dtype} but its scale {raw + fp8.SCALE_SUFFIX!r} is missing from the checkpoint"
        )
    return fp8.dequantize(raw, t, scale, scheme, dtype)


def read_tensors(files: list[Path], hf: dict, model: WeightSink, where: dict) -> Iterator[tuple[str, Tensor]]:
    """(Hugging Face name, tensor) of every tensor ``model`` needs, in file order; ``where["file"]`` tracks
    the file being read, for error messages. Unneeded tensors (vision tower, other ranks' experts) are
    never read."""
    from safetensors import SafetensorError

    rename, transform = _renamer(hf), _transform(hf)
    scheme = fp8.fp8_scheme(hf)
    dtype = getattr(model, "dtype", torch.float32)
    try:
        with ExitStack() as stack:
            shards = _Shards(files, stack)
            for file, handle in shards.handles.items():
                where["file"] = file
                for raw in handle.keys():  # noqa: SIM118 -- a safetensors handle has keys(), no __iter__
                    if scheme is not None and fp8.is_scale_name(raw):
                        continue
                    name = rename(raw)
                    if name is None or not model.is_weight_needed(name):
                        continue
                    t = handle.get_tensor(raw)
                    if t.dtype in fp8.FP8_DTYPES:
                        t = _dequantized(raw, t, shards, scheme, dtype)
                    yield name, transform(name, t)
    except SafetensorError as e:
        raise ModelLoadError(f"cannot read weights file {where['file']}: {e}") from None
    where["file"] = None
