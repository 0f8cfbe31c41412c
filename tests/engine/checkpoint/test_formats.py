"""Real Mistral Small 4 checkpoint formats, written at test time from tiny transformers models:
Mistral3ForConditionalGeneration folders, FP8 block-scaled weights, Mistral's native
params.json + consolidated.safetensors + tekken.json, and the errors of each.

Tolerances: against transformers, fp32 logits within 1e-4 (as test_vs_transformers.py);
FP8 against the same weights dequantized by this file's own reference, 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint.folder import read_config
from engine.checkpoint.formats.consolidated import interleaved_to_halves
from engine.checkpoint.tiny import make_tiny, tiny_config
from engine.tokenizer import MistralCommonTokenizer, find_tokenizer, mistral_common_data_dir, text_only_messages
from tests.engine.native.models.helpers import (
    engine_model,
    hf_logits,
    hf_model,
    load_error,
    max_abs_diff,
    prompts_of,
    run_engine,
)

FP32_TOL = 1e-4
FP8_TOL = 1e-5
TEKKEN = "tekken_240718.json"  # vocab 131072


def engine_vs(path: str, ref, lengths=(6, 17), decode: int = 3, vocab: int = 512) -> float:
    """Max abs logit diff of the engine on ``path`` against a transformers model over a few prompts."""
    tokens, logits = run_engine(engine_model(path), prompts_of(list(lengths), vocab=vocab), decode)
    return max(max_abs_diff(got, hf_logits(ref, seq)) for seq, got in zip(tokens, logits))


# --------------------------------------------------------------------------- Mistral3 wrapper


def make_tiny_mistral3(text_arch: str, seed: int, out: Path, **save_kwargs) -> str:
    """A random tiny Mistral3ForConditionalGeneration (tiny text model + tiny Pixtral tower), untied head."""
    import transformers as tf

    text_cls = {"mistral": tf.MistralConfig, "mistral4": tf.Mistral4Config}[text_arch]
    vision = tf.PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=32,
        patch_size=8,
    )
    config = tf.Mistral3Config(
        text_config=text_cls(**tiny_config(text_arch)),
        vision_config=vision,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.Mistral3ForConditionalGeneration(config).to(torch.float32)
        with torch.no_grad():  # norms jittered around 1, as make_tiny does, so a misplaced norm shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape))
    model.save_pretrained(str(out), **save_kwargs)
    return str(out)


def mistral3_oracle(path: str):
    import transformers as tf

    return tf.Mistral3ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()


@pytest.mark.slow
@pytest.mark.parametrize("text_arch", ["mistral", "mistral4"])
@pytest.mark.parametrize("original_format", [True, False], ids=["language_model.model", "model.language_model"])
def test_mistral3_folder_matches_transformers(text_arch, original_format, tmp_path):
    path = make_tiny_mistral3(text_arch, 0, tmp_path, save_original_format=original_format)
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    prefix = "language_model.model." if original_format else "model.language_model."
    assert any(n.startswith(prefix) for n in names) and any("vision_tower" in n for n in names)
    cfg = read_config(tmp_path)
    assert cfg["model_type"] == text_arch and "architectures" not in cfg
    diff = engine_vs(path, mistral3_oracle(path))
    print(f"mistral3[{text_arch}]: max abs diff {diff:.2e}")
    assert diff < FP32_TOL


def test_mistral3_skips_vision_tensors_unread(tmp_path, monkeypatch):
    """The vision tower is never read: make reading any vision tensor fail."""
    from safetensors import safe_open

    path = make_tiny_mistral3("mistral", 1, tmp_path)
    real = safe_open
    read: list[str] = []

    class Spy:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr("safetensors.safe_open", Spy)
    engine_model(path)
    assert read and not [n for n in read if "vision_tower" in n or "multi_modal_projector" in n]


def test_mistral3_unsupported_text_model_is_named(tmp_path):
    path = make_tiny_mistral3("mistral", 0, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["model_type"] = "qwen2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "text_config.model_type 'qwen2' is not supported" in load_error(path)


# --------------------------------------------------------------------------- FP8 block scales


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] -> (float8_e4m3fn [..., R, C], scale_inv [..., ceil(R/b0), ceil(C/b1)]) by block amax;
    one scalar scale when ``block`` is None."""
    if block is None:
        scale = (w.abs().max() / 448.0).clamp(min=1e-12)
        return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
    b0, b1 = block
    rows, cols = w.shape[-2:]
    nr, nc = -(-rows // b0), -(-cols // b1)
    scale = torch.empty(*w.shape[:-2], nr, nc)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            tile = w[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            s = (tile.abs().amax(dim=(-2, -1)) / 448.0).clamp(min=1e-12)  # [...]
            scale[..., i, j] = s
            q[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (tile / s[..., None, None]).to(torch.float8_e4m3fn)
    return q, scale


def reference_dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """The plainest dequantization: every block times its scale, block by block."""
    if scale.numel() == 1:
        return q.float() * scale.float().reshape(())
    b0, b1 = block
    out = q.float()
    for i in range(scale.shape[-2]):
        for j in range(scale.shape[-1]):
            out[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] *= scale[..., i, j, None, None]
    return out


def _quantized(name: str) -> bool:
    """Linear and expert weights, as Small 4 ships them; embeddings, norms, router and head stay full."""
    return (
        name.endswith(("_proj.weight", "experts.gate_up_proj", "experts.down_proj"))
        or ".experts." in name
        and name.endswith((".w1.weight", ".w2.weight", ".w3.weight"))
    )


def write_fp8(src: str, dst: Path, block: tuple[int, int]) -> Path:
    """FP8 copy of a tiny checkpoint at ``dst``, and its reference-dequantized fp32 twin at ``dst``-ref.

    Layer 0's o_proj gets a per-tensor scale ([] shaped; [1] for q_proj of the last layer)."""
    ref_dir = dst.parent / (dst.name + "-ref")
    shutil.copytree(src, dst)
    shutil.copytree(src, ref_dir)
    tensors = load_file(str(dst / "model.safetensors"))
    out, ref = {}, {}
    last = max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    for name, w in tensors.items():
        if not _quantized(name):
            out[name] = ref[name] = w
            continue
        per_tensor = name.endswith(("layers.0.self_attn.o_proj.weight", f"layers.{last}.self_attn.q_proj.weight"))
        q, s = quantize_fp8(w, None if per_tensor else block)
        if name.endswith(f"layers.{last}.self_attn.q_proj.weight"):
            s = s.reshape(1)
        out[name], out[name + "_scale_inv"] = q, s
        ref[name] = reference_dequant(q, s, block)
    first = next(n for n in out if n.endswith("_scale_inv"))
    out[first[: -len("weight_scale_inv")] + "activation_scale"] = torch.tensor(1.0)  # ignored: dynamic activations
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": list(block),
        "activation_scheme": "dynamic",
        "modules_to_not_convert": ["lm_head"],
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    return ref_dir


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """arch -> (fp8 folder, reference folder); 16x24 blocks so rows and columns both end in partial blocks."""
    made = {}

    def get(arch: str):
        if arch not in made:
            root = tmp_path_factory.mktemp(f"fp8-{arch}")
            src = make_tiny(arch, 0, str(root / "src"))
            made[arch] = (root / "fp8", write_fp8(src, root / "fp8", (16, 24)))
        return made[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "mixtral", "mistral4"])  # dense, per-expert w1/w2/w3, fused experts
def test_fp8_block_scaled_equals_reference_dequant(arch, fp8_dirs):
    fp8_dir, ref_dir = fp8_dirs(arch)
    names = load_file(str(fp8_dir / "model.safetensors"))
    assert any(t.dtype == torch.float8_e4m3fn and t.dim() == 3 for t in names.values()) or arch != "mistral4"
    ours, ref = engine_model(str(fp8_dir)), engine_model(str(ref_dir))
    for name, p in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], p), name
    prompts = prompts_of([7, 15])
    _, a = run_engine(ours, prompts, 2)
    _, b = run_engine(ref, prompts, 2)
    assert max(max_abs_diff(x, y) for x, y in zip(a, b)) < FP8_TOL


def test_fp8_dequantizes_to_model_dtype(fp8_dirs):
    fp8_dir, ref_dir = fp8_dirs("mistral")
    ours = engine_model(str(fp8_dir), dtype="bfloat16")
    ref = engine_model(str(ref_dir), dtype="bfloat16")
    w = ours.model.layers[1].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, ref.model.layers[1].self_attn.q_proj.weight)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_fp8_against_transformers(tmp_path, arch):
    """transformers' fine-grained FP8 on CPU dequantizes at load (and only grids that divide the
    weights: 8x8 blocks here); when it refuses to load at all, this comparison is skipped. Mistral 4's
    fused expert scales are not read by transformers 5.19 (it reports them UNEXPECTED): that
    architecture is checked against the reference dequantization above."""
    src = make_tiny(arch, 1, str(tmp_path / "src"), num_hidden_layers=2)
    fp8_dir = tmp_path / "fp8"
    write_fp8(src, fp8_dir, (8, 8))
    try:
        ref = hf_model(arch, str(fp8_dir))
    except Exception as e:  # noqa: BLE001 - any refusal of transformers' FP8 path on this machine
        pytest.skip(f"transformers cannot load an FP8 checkpoint here: {type(e).__name__}: {e}")
    assert engine_vs(str(fp8_dir), ref) < FP32_TOL


def test_fp8_missing_scale_names_tensor(fp8_dirs, tmp_path):
    fp8_dir, _ = fp8_dirs("mistral")
    broken = tmp_path / "m"
    shutil.copytree(fp8_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight_scale_inv")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    message = load_error(str(broken))
    assert "'model.layers.1.mlp.up_proj.weight_scale_inv' is missing" in message
    assert "model.safetensors" in message


def test_fp8_bad_scale_shape_and_unknown_method(fp8_dirs, tmp_path):
    fp8_dir, _ = fp8_dirs("mistral")
    broken = tmp_path / "m"
    shutil.copytree(fp8_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert "'model.layers.1.mlp.up_proj.weight_scale_inv' has shape (3, 3), expected (8, 3)" in load_error(str(broken))
    cfg = json.loads((broken / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "quant_method 'gptq' is not supported" in load_error(str(broken))


# --------------------------------------------------------------------------- Mistral native (consolidated)


def halves_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF's half-split q/k rows back to Mistral's interleaved rotary pairs (the inverse of the loader's)."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_NATIVE = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "block_sparse_moe.gate": "feed_forward.gate",
}


def native_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    layer, rest = hf[len("model.layers.") :].split(".", 1)
    rest = rest.removesuffix(".weight")
    if rest.startswith("block_sparse_moe.experts."):
        rest = "feed_forward.experts." + rest[len("block_sparse_moe.experts.") :]
    return f"layers.{layer}.{_NATIVE.get(rest, rest)}.weight"


def write_consolidated(src: str, dst: Path, tokenizer: str | None = None, shards: int = 1) -> str:
    """Mistral's native folder for a tiny HF Mistral/Mixtral: params.json, consolidated weights, tekken.json."""
    cfg = json.loads((Path(src) / "config.json").read_text())
    params = {
        "dim": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "head_dim": cfg["head_dim"],
        "hidden_dim": cfg["intermediate_size"],
        "n_heads": cfg["num_attention_heads"],
        "n_kv_heads": cfg["num_key_value_heads"],
        "norm_eps": cfg["rms_norm_eps"],
        "vocab_size": cfg["vocab_size"],
        "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "max_seq_len": cfg["max_position_embeddings"],
    }
    if "num_local_experts" in cfg:
        params["moe"] = {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}
    tensors = {}
    for name, w in load_file(str(Path(src) / "model.safetensors")).items():
        if name.endswith("self_attn.q_proj.weight"):
            w = halves_to_interleaved(w, cfg["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = halves_to_interleaved(w, cfg["num_key_value_heads"])
        tensors[native_name(name)] = w.contiguous()
    dst.mkdir()
    (dst / "params.json").write_text(json.dumps(params))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dst / "consolidated.safetensors"))
    for k in range(shards if shards > 1 else 0):
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(dst / f"consolidated-{k + 1:05d}-of-{shards:05d}.safetensors"))
    if tokenizer:
        shutil.copy(mistral_common_data_dir() / tokenizer, dst / "tekken.json")
    return str(dst)


def test_native_qk_permutation_matches_interleaved_rotary():
    """Meta/Mistral rotary (pairs (2i, 2i+1) rotated together) on native rows == HF's rotate_half on the
    permuted rows: the same rotated vector, up to the same row permutation for q and k."""
    torch.manual_seed(0)
    heads, dim, hidden, pos = 2, 8, 12, 5
    w_native = torch.randn(heads * dim, hidden, dtype=torch.float64)
    x = torch.randn(hidden, dtype=torch.float64)
    freqs = pos * 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [D/2]

    q = (w_native @ x).view(heads, dim // 2, 2)  # interleaved pairs
    rotated = torch.view_as_real(torch.view_as_complex(q) * torch.polar(torch.ones_like(freqs), freqs))
    native_rotated = rotated.reshape(heads, dim)  # [H, D] interleaved

    q_hf = (interleaved_to_halves(w_native, heads) @ x).view(heads, dim)  # [H, D] halves
    cos, sin = torch.cat([freqs.cos()] * 2), torch.cat([freqs.sin()] * 2)
    half = torch.cat([-q_hf[:, dim // 2 :], q_hf[:, : dim // 2]], dim=-1)
    hf_rotated = q_hf * cos + half * sin
    # HF position j*D/2 + i holds native position 2*i + j
    assert torch.allclose(hf_rotated, native_rotated.view(heads, dim // 2, 2).transpose(1, 2).reshape(heads, dim))
    assert torch.equal(halves_to_interleaved(interleaved_to_halves(w_native, heads), heads), w_native)


@pytest.mark.slow
def test_consolidated_mistral_with_tekken_matches_transformers(tmp_path):
    src = make_tiny("mistral", 0, str(tmp_path / "hf"), vocab_size=131072)
    path = write_consolidated(src, tmp_path / "native", tokenizer=TEKKEN)
    cfg = read_config(Path(path))
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] is None
    diff = engine_vs(path, hf_model("mistral", src), vocab=131072)
    print(f"consolidated mistral: max abs diff {diff:.2e}")
    assert diff < FP32_TOL
    tok = find_tokenizer(path)
    assert isinstance(tok, MistralCommonTokenizer) and tok.vocab_size == cfg["vocab_size"]
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "Hello world"


@pytest.mark.slow
def test_consolidated_mixtral_sharded_matches_transformers(tmp_path):
    src = make_tiny("mixtral", 0, str(tmp_path / "hf"))
    path = write_consolidated(src, tmp_path / "native", shards=2)
    assert read_config(Path(path))["architectures"] == ["MixtralForCausalLM"]
    assert engine_vs(path, hf_model("mixtral", src)) < FP32_TOL


def _native_params(tmp_path) -> Path:
    src = make_tiny("mistral", 0, str(tmp_path / "hf"), num_hidden_layers=1)
    return Path(write_consolidated(src, tmp_path / "native"))


def test_consolidated_params_errors(tmp_path):
    folder = _native_params(tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "hidden_dim"}))
    message = load_error(str(folder))
    assert "params.json: required key 'hidden_dim' is missing" in message
    (folder / "params.json").write_text(json.dumps(dict(params, qk_nope_head_dim=64, kv_lora_rank=256)))
    assert "params.json: 'qk_nope_head_dim' (Mistral 4 / multi-head latent attention) is not supported" in load_error(
        str(folder)
    )
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "consolidated.safetensors").unlink()
    assert "no consolidated.safetensors" in load_error(str(folder))


def test_consolidated_bad_tensor_name_is_named(tmp_path):
    folder = _native_params(tmp_path)
    tensors = load_file(str(folder / "consolidated.safetensors"))
    tensors["layers.0.attention.wz.weight"] = torch.ones(2)
    save_file(tensors, str(folder / "consolidated.safetensors"))
    message = load_error(str(folder))
    assert "unexpected tensor 'layers.0.attention.wz.weight'" in message and "consolidated.safetensors" in message


# --------------------------------------------------------------------------- chat content parts


def test_image_content_is_refused_naming_the_part():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            ],
        }
    ]
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]: image input is not supported by this engine$"):
        text_only_messages(messages)
    with pytest.raises(ValueError, match=r"^messages\[1\]\.content\[0\]: image input"):
        text_only_messages([{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]: only text parts are supported"):
        text_only_messages([{"role": "user", "content": [{"type": "input_audio"}]}])


def test_text_parts_encode_like_a_string():
    tok = MistralCommonTokenizer(str(mistral_common_data_dir() / TEKKEN))
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "Hello\nworld"}])
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]: image input"):
        tok.apply_chat_template(image)
