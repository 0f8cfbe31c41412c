"""Tiny random checkpoints, written by transformers itself, for tests.

``make_tiny("mistral4", seed=0, out=dir)`` builds the transformers model from
a small config under a fixed seed and ``save_pretrained``s it; the global torch
RNG is left untouched. RMSNorm weights are jittered around 1 so a misplaced norm
shows.

``initializer_range=0.2`` keeps logits lively (std ~1.6, not flat) while
transformers' own fp32 logits stay within ~2.5e-5 of float64 on ~130-token
sequences. At 0.3 the activations run hot enough that transformers' fp32
drifts 8e-5 (Mixtral) to 1.1e-4 (Mistral 4) from float64 -- the 1e-4
equality bar would then measure noise, not correctness.

Keyword overrides go into the config (``sliding_window=8``,
``num_hidden_layers=4``...), except two that go to ``save_pretrained``:
``save_original_format`` (False writes transformers' fused expert tensors
instead of the per-expert original layout) and ``max_shard_size`` (e.g.
``"100KB"`` for a sharded checkpoint with an index).

``make_tiny_with_tokenizer`` also copies a tokenizer beside the weights and
sizes the vocabulary to it, so the folder runs on its own (``levante
generate --model DIR "text"``).
"""

from __future__ import annotations

import copy
import os
import shutil

import torch

ARCHS = ("mistral", "mixtral", "mistral4", "llama")

_BASE = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=32768,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_CONFIGS = {
    "mistral": dict(
        _BASE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "llama": dict(
        _BASE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "mixtral": dict(
        _BASE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=None,
        num_local_experts=8,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # Shaped like Mistral Small 4 (MLA, YaRN with llama-4 query scaling, grouped routing, shared
    # expert, a dense first layer), shrunk; original_max_position_embeddings is small so YaRN's
    # ramp and the llama-4 scale both change within a few dozen positions.
    "mistral4": dict(
        _BASE,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        rope_interleave=True,
        pad_token_id=11,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 128.0,
            "original_max_position_embeddings": 16,
            "max_position_embeddings": 32768,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
    ),
}

_SAVE_KWARGS = ("save_original_format", "max_shard_size")


def tiny_config(arch: str, **overrides) -> dict:
    """The config kwargs make_tiny uses for ``arch`` (after overrides)."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choices: {ARCHS}")
    cfg = copy.deepcopy(_CONFIGS[arch])
    cfg.update(overrides)
    return cfg


def _transformers_classes(arch: str):
    import transformers as tf

    return {
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "mistral4": (tf.Mistral4Config, tf.Mistral4ForCausalLM),
    }[arch]


def make_tiny(arch: str, seed: int, out: str, **overrides) -> str:
    """Write a random tiny ``arch`` checkpoint (config.json + safetensors) to ``out``; returns ``out``."""
    save_kwargs = {k: overrides.pop(k) for k in _SAVE_KWARGS if k in overrides}
    cfg = tiny_config(arch, **overrides)
    config_cls, model_cls = _transformers_classes(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**cfg)).to(torch.float32)
        norm_gen = torch.Generator().manual_seed(seed + 1_000_003)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=norm_gen))
    model.save_pretrained(out, **save_kwargs)
    return out


# A Hugging Face tokenizer folder's files, copied when present.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _tokenizer_files(path: str) -> list[str]:
    """The files that make up the tokenizer at ``path`` (a mistral-common file, or a folder holding one
    or a Hugging Face tokenizer)."""
    from engine.tokenizer import mistral_tokenizer_file

    mistral = mistral_tokenizer_file(path)
    if mistral:
        return [mistral]
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in _HF_TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    raise ValueError(
        f"tokenizer: {path} cannot be copied into a tiny checkpoint "
        f"(expected a tekken*.json or *.model.v* file, or a tokenizer folder)"
    )


def make_tiny_with_tokenizer(arch: str, seed: int, out: str, tokenizer: str, **overrides) -> str:
    """``make_tiny`` with ``tokenizer`` (a path or ``mistral-common:<file>``) copied into ``out``; the config's
    vocab_size and bos/eos ids come from it unless overridden. Returns ``out``."""
    from engine.tokenizer import load_tokenizer, resolve_tokenizer_path

    path = resolve_tokenizer_path(tokenizer)
    tok = load_tokenizer(path)
    files = _tokenizer_files(path)
    special = {
        k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id)) if v is not None
    }
    make_tiny(arch, seed, out, **{"vocab_size": tok.vocab_size, **special, **overrides})
    for file in files:
        shutil.copy2(file, out)
    return out
