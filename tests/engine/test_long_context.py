"""Long prompts: final logits equal transformers' (16K, and 32K with YaRN far past its original length), KV
memory is what the sequence needs, and at 256K greedy tokens do not depend on prefill chunking or the prefix cache."""

from __future__ import annotations

import random
import time

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

    hf = _hf_sdpa_padded_v(path)  # plain sdpa falls back to the math kernel here: 4 GB of scores at 16K
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


def _hf_sdpa_padded_v(path: str):
    """transformers' model for ``path`` on SDPA with V zero-padded to the query/key head dim.

    Mistral 4's attention has qk_head_dim 24 and v_head_dim 16 here; torch's CPU flash kernel needs
    equal dims, so plain ``sdpa`` falls back to the math kernel, which materializes ``[H, N, N]`` float
    scores (4 GB at 16K, 16 GB at 32K: out of memory on a 2-core CI box). Zero columns in V change no
    output column that is kept, so this is the same attention, in flash's memory.
    """
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attend(module, query, key, value, attention_mask, **kwargs):
        dv = value.shape[-1]
        value = F.pad(value, (0, query.shape[-1] - dv))
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out[..., :dv], weights  # out [B, N, H, D]

    AttentionInterface.register("sdpa_padded_v", attend)
    AttentionMaskInterface.register("sdpa_padded_v", sdpa_mask)
    hf = load_hf_reference(path)
    hf.set_attn_implementation("sdpa_padded_v")
    return hf


def test_32k_prompt_with_yarn_logits_equal_transformers(tmp_path):
    """Positions far past YaRN's original_max_position_embeddings (16 in the tiny Mistral 4), near its
    32768 max_position_embeddings, prefilled in 4096-token chunks through the tiled attention."""
    path = make_tiny("mistral4", seed=5, out=str(tmp_path / "mistral4"))
    hf_config = load_hf_reference(path).config
    original = hf_config.rope_parameters["original_max_position_embeddings"]
    n = 32 * 1024 - 3  # the prompt and one new token fit max_position_embeddings; not a multiple of the block size
    assert hf_config.rope_parameters["rope_type"] == "yarn" and n > 1000 * original
    llm = LLM(
        config=EngineConfig(
            model=ModelConfig(model=path),
            cache=CacheConfig(block_size=16),
            scheduler=SchedulerConfig(max_num_batched_tokens=4096),
        )
    )
    rng = random.Random(1)
    prompt = [rng.randrange(3, llm.engine.vocab_size) for _ in range(n)]
    seen = {}
    llm.engine.runner.logits_hook = lambda ids, logits: seen.setdefault("first", logits[0].clone())
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    del llm

    hf = _hf_sdpa_padded_v(path)
    start = time.perf_counter()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
    diff = (seen["first"] - ref).abs().max().item()
    print(
        f"32K prompt (YaRN): final logits max abs diff {diff:.2e}; transformers took {time.perf_counter() - start:.1f}s"
    )
    assert diff < 1e-4


N_256K = 256 * 1024
# The tiny Mistral 4 cut to what the 256K test is about: one layer (the dense first one: MLA attention
# and YaRN, no MoE), one head, a narrow latent. The test checks attention across prefill chunk
# boundaries and a prefix-cache hit; more layers, heads or the MoE would only multiply its minutes
# (its attention alone is 2^35 query-key pairs per cold prefill). The 16K and 32K tests run the whole model.
SMALL_256K = dict(
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=N_256K + 64,
)


def _greedy_run(llm, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """(greedy tokens, logits of the first sampled position) of one request."""
    seen = {}
    llm.engine.runner.logits_hook = lambda ids, logits: seen.setdefault("first", logits[0].clone())
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return list(out.token_ids), seen["first"]


def _engine(path: str, chunk: int) -> LLM:
    blocks = -(-(N_256K + 8) // 16) + 1  # the sequence and the null block: the cache holds what it needs
    return LLM(
        config=EngineConfig(
            model=ModelConfig(model=path),
            cache=CacheConfig(block_size=16, num_blocks=blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=chunk, long_prefill_token_threshold=chunk),
        )
    )


def test_256k_greedy_identical_across_chunk_sizes_and_prefix_cache_hit(tmp_path):
    path = make_tiny("mistral4", seed=3, out=str(tmp_path / "mistral4"), **SMALL_256K)
    rng = random.Random(2)
    prompt = [rng.randrange(3, 512) for _ in range(N_256K - 5)]  # ends mid-block
    runs = {}
    for chunk in (512, 8192):
        llm = _engine(path, chunk)
        start = time.perf_counter()
        runs[chunk] = _greedy_run(llm, prompt)
        print(f"256K cold prefill, chunk {chunk}: {time.perf_counter() - start:.1f}s, tokens {runs[chunk][0]}")
    hits_before = llm.engine.scheduler.get_stats().prefix_cache_hits
    start = time.perf_counter()
    runs["hit"] = _greedy_run(llm, prompt)  # the same prompt again, on the chunk-8192 engine: its blocks are cached
    print(f"256K prefix-cache hit: {time.perf_counter() - start:.1f}s, tokens {runs['hit'][0]}")
    assert llm.engine.scheduler.get_stats().prefix_cache_hits > hits_before
    assert runs[512][0] == runs[8192][0] == runs["hit"][0]
    assert len(set(runs[512][0])) > 1, "a constant continuation would make the comparison weak"
    for key in (8192, "hit"):
        torch.testing.assert_close(runs[key][1], runs[512][1], atol=1e-4, rtol=0)
