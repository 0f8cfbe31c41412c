"""Mistral's native format: ``params.json`` + ``consolidated*.safetensors`` (+ ``tekken.json``).

``params.json`` maps onto a Hugging Face config dict (``dim`` -> hidden_size,
``hidden_dim`` -> intermediate_size, ``moe`` -> Mixtral routing...), and
tensor names onto Hugging Face ones (``layers.3.attention.wq.weight`` ->
``model.layers.3.self_attn.q_proj.weight``). Native q/k rows keep each head's
rotary pairs interleaved (Meta's original layout, as llama.cpp does), while
Hugging Face rotates half-split heads: q/k are permuted at load, the same
permutation as transformers' conversion script and vLLM's mistral loader.

Dense Mistral and Mixtral-style MoE are supported. Mistral 4 (MLA), YaRN,
native quantization and vision encoders are refused naming ``params.json``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from engine.checkpoint.files import ModelLoadError, read_json_object

FORMAT = "consolidated"
PARAMS = "params.json"
_REQUIRED = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")
# params.json keys this loader cannot honour yet, and why.
_UNSUPPORTED = {
    "qk_nope_head_dim": "Mistral 4 / multi-head latent attention",
    "kv_lora_rank": "Mistral 4 / multi-head latent attention",
    "yarn": "YaRN rope scaling",
    "llama_4_scaling": "llama-4 query scaling",
    "quantization": "native quantization",
    "lora": "LoRA adapters",
}

_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "mlp.gate",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w1|w2|w3)")
# a native vision encoder beside the text model (Pixtral style): not read
_SKIPPED = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")


def _has_hf_weights(folder: Path) -> bool:
    return (folder / "model.safetensors.index.json").is_file() or any(
        not p.name.startswith("consolidated") for p in folder.glob("*.safetensors")
    )


def is_consolidated(folder: Path) -> bool:
    """A native folder: params.json, and no config.json with Hugging Face weights beside it (Mistral's
    repositories ship both formats; the Hugging Face one is then read)."""
    return (folder / PARAMS).is_file() and not ((folder / "config.json").is_file() and _has_hf_weights(folder))


def read_params(folder: Path) -> dict:
    path = folder / PARAMS
    return hf_config(read_json_object(path), path)


def _check_params(params: dict, path: Path) -> None:
    for key in _REQUIRED:
        if key not in params:
            raise ModelLoadError(f"{path}: required key {key!r} is missing")
    for key, what in _UNSUPPORTED.items():
        if params.get(key):
            raise ModelLoadError(
                f"{path}: {key!r} ({what}) is not supported in Mistral's native format here; "
                f"use the model's Hugging Face-format folder"
            )


def _sliding_window(params: dict, path: Path) -> int | None:
    window = params.get("sliding_window")
    if isinstance(window, list):  # per-layer pattern: only a uniform one maps onto one window
        if len(set(window)) != 1:
            raise ModelLoadError(f"{path}: per-layer sliding_window {window!r} is not supported")
        window = window[0]
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise ModelLoadError(f"{path}: sliding_window must be an integer or null, got {window!r}")
    return window


def _moe_config(moe: dict, params: dict, path: Path) -> dict:
    """Mixtral routing keys from params.json's ``moe`` (anything else in it is refused)."""
    extra = sorted(k for k, v in moe.items() if k not in ("num_experts", "num_experts_per_tok") and v)
    expert_dim = moe.get("expert_hidden_dim", params["hidden_dim"])
    if extra and extra != ["expert_hidden_dim"] or expert_dim != params["hidden_dim"]:
        raise ModelLoadError(
            f"{path}: moe keys {extra} are not supported (only Mixtral-style num_experts / num_experts_per_tok)"
        )
    try:
        return {"num_local_experts": int(moe["num_experts"]), "num_experts_per_tok": int(moe["num_experts_per_tok"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: moe needs integer num_experts and num_experts_per_tok ({e!r})") from None


def hf_config(params: dict, path: Path) -> dict:
    """A Hugging Face config dict (Mistral or Mixtral) for a ``params.json`` dict."""
    _check_params(params, path)
    heads = params["n_heads"]
    max_len = params.get("max_position_embeddings", params.get("max_seq_len", 128_000))
    hf = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": params["vocab_size"],
        "hidden_size": params["dim"],
        "intermediate_size": params["hidden_dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": params.get("n_kv_heads") or heads,
        "head_dim": params.get("head_dim") or params["dim"] // heads,
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "max_position_embeddings": max_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        "sliding_window": _sliding_window(params, path),  # explicit: MistralConfig defaults an absent key to 4096
        "hidden_act": params.get("activation", "silu"),
        "tie_word_embeddings": bool(params.get("tied_embeddings", False)),
        "levante_format": FORMAT,
    }
    moe = params.get("moe")
    if moe:
        if not isinstance(moe, dict):
            raise ModelLoadError(f"{path}: moe must be an object")
        hf.update(_moe_config(moe, params, path), architectures=["MixtralForCausalLM"], model_type="mixtral")
    return hf


def weight_files(folder: Path) -> list[Path]:
    single = folder / "consolidated.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("consolidated-*-of-*.safetensors"))
    if shards:
        return shards
    raise ModelLoadError(
        f"no consolidated.safetensors (or consolidated-*-of-*.safetensors) beside {PARAMS} in {folder}"
    )


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a native tensor (None: skipped); an unknown name passes through for the model
    to name in its error."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith(_SKIPPED):
        return None
    m = _LAYER.fullmatch(name)
    if m is None:
        return name
    layer, part = m.groups()
    expert = _EXPERT.fullmatch(part)
    if expert is not None:  # Mixtral routed expert: the decoder takes per-expert w1/w2/w3
        return f"model.layers.{layer}.mlp.experts.{expert.group(1)}.{expert.group(2)}.weight"
    if part in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.weight"
    return name


def interleaved_to_halves(w: Tensor, num_heads: int) -> Tensor:
    """q/k rows from interleaved rotary pairs (Meta, Mistral native, llama.cpp) to Hugging Face's halves.

    Interleaved row ``h*D + 2*i + j`` holds HF row ``h*D + j*D/2 + i``, so HF = view(H, D/2, 2) swapped to (H, 2, D/2).
    """
    shape = w.shape  # [H*D, hidden]
    head_dim = shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def qk_permuter(hf: dict) -> Callable[[str, Tensor], Tensor]:
    """A (HF name, tensor) -> tensor map that permutes q/k projections to Hugging Face's rotary layout."""
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]

    def permute(name: str, w: Tensor) -> Tensor:
        if name.endswith(".self_attn.q_proj.weight"):
            return interleaved_to_halves(w, heads)
        if name.endswith(".self_attn.k_proj.weight"):
            return interleaved_to_halves(w, kv_heads)
        return w

    return permute
