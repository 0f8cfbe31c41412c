"""Checkpoint layouts, architecture resolution, KV cache specs, and one-line load errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint.tiny import make_tiny
from engine.native.models.base import KVCacheSpec
from engine.native.models.layers import RoutedMoE
from engine.native.models.mistral import LlamaForCausalLM, MistralForCausalLM
from engine.native.models.mistral4 import Mistral4ForCausalLM
from engine.native.models.mixtral import MixtralForCausalLM
from engine.native.models.registry import resolve_architecture
from kernels.linear import cpu as cpu_linear
from kernels.moe import panels as moe_panels
from tests.engine.native.models.helpers import engine_model, load_error


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return make_tiny("mistral", 0, str(tmp_path_factory.mktemp("mistral")))


def copy_dir(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# --------------------------------------------------------------------------- errors


def test_missing_config_json(mistral_dir, tmp_path):
    path = copy_dir(mistral_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    assert "no config.json" in load_error(path)


def test_unsupported_architecture_names_it_and_lists_supported(mistral_dir, tmp_path):
    path = copy_dir(mistral_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["Qwen2ForCausalLM"], "qwen2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    message = load_error(path)
    assert "Qwen2ForCausalLM" in message
    for arch in ("MistralForCausalLM", "LlamaForCausalLM", "MixtralForCausalLM", "Mistral4ForCausalLM"):
        assert arch in message


def _rewrite_weights(folder, edit) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor(mistral_dir, tmp_path):
    path = copy_dir(mistral_dir, tmp_path / "m")
    _rewrite_weights(tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    message = load_error(path)
    assert "'model.layers.1.self_attn.k_proj.weight' is missing" in message


def test_wrong_shape_names_tensor_and_file(mistral_dir, tmp_path):
    path = copy_dir(mistral_dir, tmp_path / "m")
    _rewrite_weights(tmp_path / "m", lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    message = load_error(path)
    assert "'model.norm.weight' has shape (63,), expected (64,)" in message
    assert "model.safetensors" in message


def test_unexpected_tensor(mistral_dir, tmp_path):
    path = copy_dir(mistral_dir, tmp_path / "m")
    _rewrite_weights(tmp_path / "m", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    assert "unexpected tensor 'model.layers.0.mlp.extra.weight'" in load_error(path)


def test_no_weights(mistral_dir, tmp_path):
    path = copy_dir(mistral_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    assert "no weights" in load_error(path)


def test_missing_shard(tmp_path):
    path = make_tiny("mistral", 0, str(tmp_path / "m"), max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = max(set(index["weight_map"].values()))
    (tmp_path / "m" / shard).unlink()
    assert f"weight shard {shard}" in load_error(path)


def test_nonexistent_path(tmp_path):
    assert "does not exist" in load_error(str(tmp_path / "nope"))


def test_missing_routed_expert(tmp_path):
    path = make_tiny("mixtral", 0, str(tmp_path / "m"), num_hidden_layers=1)
    _rewrite_weights(tmp_path / "m", lambda t: t.pop("model.layers.0.block_sparse_moe.experts.3.w3.weight"))
    message = load_error(path)
    assert "model.layers.0.mlp.experts" in message and "expert 3 w3/up_proj" in message


def test_unsupported_config_value_is_a_clear_error(mistral_dir, tmp_path):
    path = copy_dir(mistral_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert "rope_type='dynamic' is not supported" in load_error(path)


# --------------------------------------------------------------------------- layouts


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def test_mixtral_fused_and_original_expert_layouts_load_identically(tmp_path):
    original = make_tiny("mixtral", 2, str(tmp_path / "orig"))
    fused = make_tiny("mixtral", 2, str(tmp_path / "fused"), save_original_format=False)
    names = load_file(str(tmp_path / "fused" / "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # transformers' in-memory layout
    names = load_file(str(tmp_path / "orig" / "model.safetensors")).keys()
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names  # what save_pretrained writes
    a, b = _params(engine_model(original)), _params(engine_model(fused))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("vendor", "c_kernel", "form"),
    [("AuthenticAMD", False, "onednn"), ("GenuineIntel", False, "as loaded"), ("GenuineIntel", True, "panels")],
)
def test_each_moe_layers_experts_are_prepared_by_its_backend_at_load(tmp_path, vendor, c_kernel, form, monkeypatch):
    if c_kernel and moe_panels.library() is None:
        pytest.skip("the C routed experts cannot run on this machine (the warning above says why)")
    if not c_kernel:
        monkeypatch.setattr(moe_panels, "library", lambda: None)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    cpu_linear.packed_from_rows.cache_clear()
    try:
        model = engine_model(make_tiny("mixtral", 2, str(tmp_path / "m")))
    finally:
        cpu_linear.packed_from_rows.cache_clear()
    layers = [m for m in model.modules() if isinstance(m, RoutedMoE)]
    assert layers and all(m.experts.prepared is not None for m in layers)
    onednn = form == "onednn" and torch.backends.mkldnn.is_available()
    for moe in layers:
        experts = moe.experts.prepared
        assert experts.gate_up is moe.experts.gate_up_proj and experts.down is moe.experts.down_proj
        assert (experts.packed is not None) == onednn and (experts.panels is not None) == (form == "panels")
        if experts.packed is not None:  # one (gate_up, down) pair a local expert
            assert len(experts.packed) == moe.experts.num_local_experts
        if experts.panels is not None:
            assert experts.panels.gate_up.shape[0] == moe.experts.num_local_experts


def test_per_expert_gate_up_down_proj_layout(tmp_path):
    """DeepSeek/Qwen-MoE style per-expert names, made by splitting a fused Mistral 4 checkpoint."""
    fused = make_tiny("mistral4", 2, str(tmp_path / "fused"))
    split_dir = tmp_path / "split"
    shutil.copytree(fused, split_dir)

    def split(tensors):
        for name in [n for n in tensors if n.endswith("mlp.experts.gate_up_proj")]:
            prefix = name[: -len("gate_up_proj")]
            gate_up, down = tensors.pop(name), tensors.pop(prefix + "down_proj")
            inter = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
                tensors[f"{prefix}{e}.up_proj.weight"] = gate_up[e, inter:].clone()
                tensors[f"{prefix}{e}.down_proj.weight"] = down[e].clone()

    _rewrite_weights(split_dir, split)
    a, b = _params(engine_model(fused)), _params(engine_model(str(split_dir)))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharded_checkpoint_loads(tmp_path):
    single = make_tiny("mistral", 4, str(tmp_path / "single"))
    sharded = make_tiny("mistral", 4, str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = _params(engine_model(single)), _params(engine_model(sharded))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_make_tiny_is_deterministic(tmp_path):
    a = load_file(make_tiny("mistral4", 9, str(tmp_path / "a")) + "/model.safetensors")
    b = load_file(make_tiny("mistral4", 9, str(tmp_path / "b")) + "/model.safetensors")
    c = load_file(make_tiny("mistral4", 10, str(tmp_path / "c")) + "/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_tied_embeddings_share_one_tensor(tmp_path):
    model = engine_model(make_tiny("mistral", 0, str(tmp_path), tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --------------------------------------------------------------------------- registry and cache spec


@pytest.mark.parametrize(
    "cfg, cls",
    [
        ({"architectures": ["MistralForCausalLM"]}, MistralForCausalLM),
        ({"architectures": ["LlamaForCausalLM"]}, LlamaForCausalLM),
        ({"architectures": ["MixtralForCausalLM"]}, MixtralForCausalLM),
        ({"architectures": ["Mistral4ForCausalLM"]}, Mistral4ForCausalLM),
        ({"model_type": "llama"}, LlamaForCausalLM),
        ({"model_type": "mistral4"}, Mistral4ForCausalLM),
    ],
)
def test_resolve_architecture(cfg, cls):
    assert resolve_architecture(cfg) is cls


def test_resolve_architecture_rejects_unknown():
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'; supported architectures: "):
        resolve_architecture({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        resolve_architecture({"model_type": "gpt2"})


def test_kv_cache_specs(tmp_path):
    gqa = engine_model(make_tiny("mistral", 0, str(tmp_path / "a")))
    spec = gqa.kv_cache_spec()
    assert spec == KVCacheSpec("gqa", 2, ((2, 16), (2, 16)), torch.float32)
    assert spec.bytes_per_block(4) == 2 * 2 * (2 * 16) * 4 * 4
    caches = gqa.allocate_kv_cache(5, 4)
    assert len(caches) == 2 and [c.shape for c in caches[0]] == [(5, 4, 2, 16)] * 2
    assert all(not c.any() for layer in caches for c in layer)

    mla = engine_model(make_tiny("mistral4", 0, str(tmp_path / "b")), dtype="bfloat16")
    spec = mla.kv_cache_spec()
    # only the compressed latent (kv_lora_rank=32) and the rope key (8) per token -- no per-head K/V
    assert spec == KVCacheSpec("mla", 3, ((32 + 8,),), torch.bfloat16)
    assert spec.bytes_per_block(16) == 3 * 40 * 16 * 2
    caches = mla.allocate_kv_cache(3, 16)
    assert len(caches) == 3 and len(caches[0]) == 1 and caches[0][0].shape == (3, 16, 40)


def test_mistral_sliding_window_default_matches_transformers():
    """MistralConfig defaults sliding_window to 4096 when config.json omits it; null disables it."""
    from kernels.backend import get_attention_backend

    base = {
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    attn = get_attention_backend("reference")
    assert MistralForCausalLM(base, attention_backend=attn).cfg.sliding_window == 4096
    assert MistralForCausalLM(dict(base, sliding_window=None), attention_backend=attn).cfg.sliding_window is None
    llama = dict(base, architectures=["LlamaForCausalLM"], sliding_window=8)
    assert LlamaForCausalLM(llama, attention_backend=attn).cfg.sliding_window is None  # LlamaModel ignores it
