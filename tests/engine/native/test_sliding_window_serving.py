"""A sliding-window Mistral serves prompts longer than its whole KV cache.

Window 64, block size 16, 8 usable blocks (128 tokens): the engine drops the
blocks behind each request's window, so prompts of 300 and 170 tokens (the
second sharing the first's opening 100, a prefix-cache candidate) run in the
small cache, chunks of both in each step, preempting each other. Their greedy tokens and every
sampled logit equal transformers' on the same weights, and the tokens equal
the engine's own with a cache that holds everything.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core.request import SamplingParams
from engine.llm import LLM
from tests.engine.reference import load_hf_reference

WINDOW, BLOCK, SMALL = 64, 16, 9  # SMALL: the null block and 8 usable ones
GEN, TOL = 16, 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny("mistral", seed=11, out=str(tmp_path_factory.mktemp("swa")), sliding_window=WINDOW)
    return path, load_hf_reference(path)


def generate(path: str, num_blocks: int | None, batch: list[list[int]]):
    """Greedy outputs, the logits each request sampled from, and the engine (for its counters)."""
    llm = LLM(
        config=EngineConfig(
            model=ModelConfig(model=path),
            cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks),
            # Chunks of 24 from both prompts share each step, so they contend for the 8 blocks.
            scheduler=SchedulerConfig(max_num_batched_tokens=48, long_prefill_token_threshold=24),
        )
    )
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    llm.engine.runner.logits_hook = lambda ids, logits: [seen[r].append(logits[i].clone()) for i, r in enumerate(ids)]
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True))
    return [o.token_ids for o in outs], [torch.stack(seen[o.request_id]) for o in outs], llm.engine


def test_prompts_longer_than_the_cache_match_transformers(checkpoint):
    path, hf = checkpoint
    rng = random.Random(3)
    first = [rng.randrange(3, hf.config.vocab_size) for _ in range(300)]
    batch = [first, first[:100] + [rng.randrange(3, hf.config.vocab_size) for _ in range(70)]]

    tokens, logits, engine = generate(path, SMALL, batch)
    assert engine.scheduler.kv.sliding_window == WINDOW  # from the model, through EngineLimits
    assert engine.max_model_len == hf.config.max_position_embeddings  # the small cache caps nothing
    stats = engine.stats()
    print(f"small cache: {stats.num_preemptions} preemptions, {stats.prefix_cache_hit_tokens} prefix-hit tokens")
    assert len(first) > stats.num_blocks * BLOCK and stats.num_preemptions > 0
    assert stats.num_used_blocks == 0  # everything went back, the null block never counted

    roomy_tokens, _, _ = generate(path, None, batch)
    assert tokens == roomy_tokens

    for i, (prompt, out, ours) in enumerate(zip(batch, tokens, logits)):
        assert len(out) == GEN
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1 :]  # [GEN, V]
        diff = (ours - ref).abs().max().item()
        print(f"prompt {i} ({len(prompt)} tokens, cache {(SMALL - 1) * BLOCK}): max abs logit diff {diff:.2e}")
        assert diff < TOL
        assert ref.argmax(-1).tolist() == out
