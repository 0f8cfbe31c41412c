"""Shared test helpers: a miniature paged runner and the transformers oracle."""

from __future__ import annotations

import functools
import operator
import random

import pytest
import torch

from engine.checkpoint.files import ModelLoadError
from engine.config import ModelConfig, ParallelConfig
from engine.native.models.loader import load_model
from kernels.metadata import AttentionMetadata

ORACLE_CLASSES = {
    "mistral": "MistralForCausalLM",
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "mistral4": "Mistral4ForCausalLM",
}


def hf_model(arch: str, path: str, dtype: torch.dtype = torch.float32):
    """The transformers oracle: eager attention and eager experts (the plainest math)."""
    import transformers

    cls = getattr(transformers, ORACLE_CLASSES[arch])
    return cls.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation="eager",
        experts_implementation="eager" if arch in ("mixtral", "mistral4") else None,
    ).eval()


@torch.inference_mode()
def hf_logits(ref, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] float32 logits of one unpadded sequence (full causal forward)."""
    return ref(torch.tensor([tokens])).logits[0].float()


def engine_model(
    path: str,
    dtype: str = "float32",
    parallel: ParallelConfig = ParallelConfig(),
    backend: str = "cpu",
    device: str | None = None,
):
    model, _ = load_model(
        path, ModelConfig(dtype=dtype, device=device), parallel, attention_backend=backend, moe_backend=backend
    )
    return model


def prompts_of(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def run_engine(
    model, prompts: list[list[int]], decode_steps: int, chunk: int | None = None, block_size: int = 4, seed: int = 0
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill every prompt (in ``chunk``-token pieces, or whole), then greedy-decode
    ``decode_steps`` tokens, all sequences batched together in every step.

    Blocks are handed out shuffled (never block 0, the null block) so no
    sequence's blocks are contiguous. Returns, per sequence, the tokens fed
    (prompt + decode_steps generated) and the logits of every fed position
    ``[len(tokens), V]`` (row i predicts token i + 1), on the model's device.
    """
    total = [len(p) + decode_steps for p in prompts]
    need = [(n + block_size - 1) // block_size for n in total]
    pool = list(range(1, sum(need) + 1))
    random.Random(seed).shuffle(pool)
    block_ids, i = [], 0
    for n in need:
        block_ids.append(pool[i : i + n])
        i += n
    caches = model.allocate_kv_cache(sum(need) + 1, block_size)
    device = model.device  # step tensors go where the weights are

    tokens = [list(p) for p in prompts]
    done = [0] * len(prompts)  # positions already in the cache
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    while any(d < t for d, t in zip(done, total)):
        active = [b for b in range(len(prompts)) if done[b] < total[b]]
        step_tokens, q_lens, seq_lens = [], [], []
        for b in active:
            remaining = len(tokens[b]) - done[b]
            q = remaining if chunk is None else min(chunk, remaining)
            step_tokens.append(tokens[b][done[b] : done[b] + q])
            q_lens.append(q)
            seq_lens.append(done[b] + q)
        meta = AttentionMetadata.build(block_size, q_lens, seq_lens, [block_ids[b] for b in active], device)
        positions = torch.cat([torch.arange(s - q, s, device=device) for q, s in zip(q_lens, seq_lens)])
        hidden = model(
            torch.tensor(functools.reduce(operator.iadd, step_tokens, []), device=device), positions, meta, caches
        )
        logits = model.compute_logits(hidden)  # [T, V]
        start = 0
        for b, q in zip(active, q_lens):
            rows[b].append(logits[start : start + q])
            start += q
            done[b] += q
            if done[b] == len(tokens[b]) and len(tokens[b]) < total[b]:
                tokens[b].append(int(logits[start - 1].argmax()))  # greedy next token
    return tokens, [torch.cat(r) for r in rows]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def load_error(path: str) -> str:
    """The one-line ModelLoadError that loading ``path`` raises."""
    with pytest.raises(ModelLoadError) as info:
        load_model(path, ModelConfig())
    message = str(info.value)
    assert "\n" not in message, message
    return message
