"""A 16K-token prompt: final logits equal transformers', KV memory is what the sequence needs."""

from __future__ import annotations

import random

import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core.request import SamplingParams
from engine.llm import LLM
from tests.engine.reference import load_hf_reference

pytestmark = pytest.mark.slow
N = 16 * 1024


@pytest.mark.parametrize("arch", ["mistral4"])
def test_16k_prompt_logits_and_kv_memory(arch, tmp_path):
    path = make_tiny(arch, seed=5, out=str(tmp_path / arch))
    llm = LLM(
        config=EngineConfig(
            model=ModelConfig(model=path),
            cache=CacheConfig(block_size=16),
            scheduler=SchedulerConfig(max_num_batched_tokens=4096),
        )
    )
    vocab = llm.engine.vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(3, vocab) for _ in range(N + 5)]  # not a multiple of the block size
    seen = {}
    llm.engine.runner.logits_hook = lambda ids, logits: seen.setdefault("first", logits[0].clone())

    peak = {}
    orig = llm.engine.scheduler.update

    def update(out, sampled):  # KV use at the moment the whole prompt is cached, before it is freed
        if any(s.samples for s in out.seqs):
            peak.setdefault("stats", llm.engine.stats())
        return orig(out, sampled)

    llm.engine.scheduler.update = update
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))

    hf = load_hf_reference(path)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
    diff = (seen["first"] - ref).abs().max().item()
    print(f"{arch}: 16K prompt final logits max abs diff {diff:.2e}")
    assert diff < 1e-4

    stats = peak["stats"]
    needed = -(-len(prompt) // stats.block_size)
    assert stats.num_used_blocks == needed
    assert stats.kv_used_bytes == needed * stats.kv_bytes_per_block
    waste_tokens = needed * stats.block_size - len(prompt)
    assert 0 <= waste_tokens < stats.block_size
