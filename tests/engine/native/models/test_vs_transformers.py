"""Engine logits == transformers logits on tiny random checkpoints (fp32: max abs diff < 1e-4).

Each case prefills 3 prompts of different lengths in one varlen forward (shuffled,
non-contiguous blocks), then greedy-decodes 8 tokens for all three together, and
compares every computed position with transformers' full-sequence forward.
"""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from tests.engine.native.models.helpers import engine_model, hf_logits, hf_model, max_abs_diff, prompts_of, run_engine

FP32_TOL = 1e-4
LENGTHS = [6, 17, 30]
DECODE = 8

# name -> (arch, overrides)
CASES = {
    "mistral": ("mistral", {}),
    "mistral_sliding8": ("mistral", {"sliding_window": 8}),
    "llama_bias_tied": ("llama", {}),
    "mixtral": ("mixtral", {}),
    "mixtral_sliding8": ("mixtral", {"sliding_window": 8, "num_hidden_layers": 1}),
    "mistral4": ("mistral4", {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (arch, path); written lazily, once per module."""
    made: dict[str, tuple[str, str]] = {}

    def get(name: str) -> tuple[str, str]:
        if name not in made:
            arch, overrides = CASES[name]
            made[name] = (arch, make_tiny(arch, 0, str(tmp_path_factory.mktemp(name)), **overrides))
        return made[name]

    return get


@pytest.fixture(scope="module")
def oracles(checkpoints):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            arch, path = checkpoints(name)
            cache[name] = hf_model(arch, path)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_decode_matches_transformers(name, checkpoints, oracles):
    _arch, path = checkpoints(name)
    model = engine_model(path)
    tokens, logits = run_engine(model, prompts_of(LENGTHS), DECODE)
    ref = oracles(name)
    for seq, got in zip(tokens, logits):
        assert len(seq) == got.shape[0]
        expected = hf_logits(ref, seq)
        diff = max_abs_diff(got, expected)
        print(f"{name}: seq len {len(seq)} max abs diff {diff:.2e}")
        assert diff < FP32_TOL, f"{name}: max abs diff {diff:.3e}"
        # greedy tokens the engine chose are transformers' argmax too
        prompt_len = len(seq) - DECODE
        assert seq[prompt_len:] == expected[prompt_len - 1 : -1].argmax(-1).tolist()


@pytest.mark.parametrize("name", ["mistral_sliding8", "mixtral", "mistral4"])
def test_reference_kernels_match_transformers(name, checkpoints, oracles):
    """The same model code on the spec kernels (kernels/*/reference.py) instead of the fast CPU ones."""
    _, path = checkpoints(name)
    tokens, logits = run_engine(engine_model(path, backend="reference"), prompts_of([5, 12]), 3, chunk=7)
    for seq, got in zip(tokens, logits):
        assert max_abs_diff(got, hf_logits(oracles(name), seq)) < FP32_TOL


@pytest.mark.parametrize("name", ["mistral", "mistral_sliding8", "mixtral", "mistral4"])
def test_chunked_prefill_equals_one_shot(name, checkpoints):
    _, path = checkpoints(name)
    model = engine_model(path)
    prompts = prompts_of(LENGTHS, seed=1)
    tokens_a, logits_a = run_engine(model, prompts, 3)
    tokens_b, logits_b = run_engine(model, prompts, 3, chunk=5, seed=7)
    assert tokens_a == tokens_b
    for a, b in zip(logits_a, logits_b):
        assert max_abs_diff(a, b) < FP32_TOL


def test_sliding_window_changes_logits(checkpoints):
    """Guard against a silently ignored window: same weights, window 8 vs none differ past position 8."""
    _, full = checkpoints("mistral")
    _, windowed = checkpoints("mistral_sliding8")
    prompts = prompts_of([20])
    _, a = run_engine(engine_model(full), prompts, 0)
    _, b = run_engine(engine_model(windowed), prompts, 0)
    assert max_abs_diff(a[0][:8], b[0][:8]) < 1e-5  # inside the window: identical
    assert max_abs_diff(a[0][8:], b[0][8:]) > 1e-2


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_interleave": False, "attention_bias": True},
        {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
        {"q_lora_rank": None, "first_k_dense_replace": 0, "n_group": 2, "topk_group": 1},
    ],
    ids=["rope_not_interleaved_biased", "no_renorm_scaled", "no_q_lora_all_moe"],
)
def test_mistral4_variants(overrides, tmp_path):
    path = make_tiny("mistral4", 3, str(tmp_path), num_hidden_layers=2, **overrides)
    tokens, logits = run_engine(engine_model(path), prompts_of([9, 40]), 2)
    ref = hf_model("mistral4", path)
    for seq, got in zip(tokens, logits):
        assert max_abs_diff(got, hf_logits(ref, seq)) < FP32_TOL


def test_mistral4_long_positions_exercise_yarn_and_llama4_scale(tmp_path):
    """Positions far beyond original_max_position_embeddings (16): the llama-4 query scale is
    1 + 0.1 ln(1 + floor(p / 16)), several steps of it across this prompt."""
    path = make_tiny("mistral4", 5, str(tmp_path), num_hidden_layers=2)
    tokens, logits = run_engine(engine_model(path), prompts_of([150]), 2, chunk=64, block_size=16)
    assert max_abs_diff(logits[0], hf_logits(hf_model("mistral4", path), tokens[0])) < FP32_TOL


@pytest.mark.parametrize("name", ["mistral", "mixtral", "mistral4"])
def test_bf16_runs_and_stays_close(name, checkpoints, oracles):
    """bf16 weights and cache; its error against fp32 transformers is of the size of transformers'
    own bf16 error (these hot tiny models make bf16 noisy: up to ~4 on logits of ~10, mostly where
    a near-tie in routing picks another expert)."""
    arch, path = checkpoints(name)
    model = engine_model(path, dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.kv_cache_spec().dtype == torch.bfloat16
    tokens, logits = run_engine(model, prompts_of([12, 25]), 4)
    ref32, ref16 = oracles(name), hf_model(arch, path, dtype=torch.bfloat16)
    for seq, got in zip(tokens, logits):
        assert got.dtype == torch.float32
        exact, hf_bf16 = hf_logits(ref32, seq), hf_logits(ref16, seq)
        ours = (got - exact).abs().mean().item()
        theirs = (hf_bf16 - exact).abs().mean().item()
        print(
            f"{name} bf16: mean abs err {ours:.4f} (transformers bf16: {theirs:.4f}), "
            f"max {max_abs_diff(got, exact):.3f}"
        )
        assert ours < 1.5 * theirs + 0.01
        assert max_abs_diff(got, exact) < 0.3 * exact.abs().max().item()


@pytest.mark.parametrize(
    "arch, rope",
    [
        (
            "llama",
            {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        ("mistral", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        (
            "mistral",
            {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
        ),
        (
            "mistral",
            {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "attention_factor": 1.3,
            },
        ),
    ],
    ids=["llama3", "linear", "yarn", "yarn_attention_factor"],
)
def test_scaled_rope_types(arch, rope, tmp_path):
    path = make_tiny(arch, 6, str(tmp_path), num_hidden_layers=1, rope_parameters=rope)
    tokens, logits = run_engine(engine_model(path), prompts_of([70]), 2, chunk=32)
    assert max_abs_diff(logits[0], hf_logits(hf_model(arch, path), tokens[0])) < FP32_TOL


def test_rotary_frequencies_equal_transformers():
    """inv_freq and the cos/sin scale, straight against transformers' ROPE_INIT_FUNCTIONS."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.native.models.layers import RotaryEmbedding, standardize_rope_parameters

    cases = [
        transformers.LlamaConfig(
            head_dim=64,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        transformers.MistralConfig(
            head_dim=128,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 16.0,
                "original_max_position_embeddings": 4096,
            },
        ),
        transformers.Mistral4Config(),  # the real Mistral Small 4 defaults: yarn over the 64-dim rope part
    ]
    for config in cases:
        params = standardize_rope_parameters(config.to_dict())
        ours = RotaryEmbedding(params, config.head_dim, config.max_position_embeddings)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
        assert torch.equal(ours.inv_freq, inv_freq), type(config).__name__
        assert ours.attention_scaling == scaling
