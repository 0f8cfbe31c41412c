"""``model.quantization``: which linears a model runs quantized, and that the CPU kernels run them as the
reference (dequantize, then a plain matmul) says, through prefill and decode on the paged runner (prefill
on a bfloat16 copy of the dequantized weights, where the CPU has one: as close to float32 as the reference)."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from engine.config import EngineConfig, ModelConfig
from engine.native.models.layers import FusedLinear, Linear
from engine.native.models.loader import load_model
from engine.native.models.prepare import linears_of
from kernels.linear import vnni
from kernels.linear.cpu import native_bf16
from tests.engine.native.models.helpers import max_abs_diff, prompts_of, run_engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return lambda arch: make_tiny(arch, 0, str(tmp_path_factory.mktemp(arch)))


def schemes(model) -> dict[str, str | None]:
    """Each linear the model holds (fused ones by their owner's name) -> its scheme ("none": dense, handed to
    the kernel), None if left as loaded for F.linear."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            out[name] = module.prepared.scheme if module.prepared is not None else None
        for attr, value in vars(module).items():
            if isinstance(value, FusedLinear):
                out[f"{name}.{attr}"] = value.prepared.scheme if value.prepared is not None else None
    return out


@pytest.mark.parametrize("arch", ["mistral", "llama", "mixtral", "mistral4"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_pytorchs_kernels_run_a_quantized_model_as_the_reference_does(tiny, arch, scheme):
    path = tiny(arch)
    got, _ = load_model(path, ModelConfig(quantization=scheme, linear_backend="cpu_weight_only"))
    want, _ = load_model(path, ModelConfig(quantization=scheme, linear_backend="reference"))
    assert schemes(got) == schemes(want) and scheme in schemes(want).values()
    prompts = prompts_of([5, 11], vocab=500)
    # One token a sequence a step (decode-shaped): the weight-only kernels. bfloat16 activations: float32
    # accumulation order may move a value one bfloat16 step.
    _, got_logits = run_engine(got, prompts, decode_steps=0, chunk=1)
    _, want_logits = run_engine(want, prompts, decode_steps=0, chunk=1)
    for g, w in zip(got_logits, want_logits):
        assert max_abs_diff(g, w) <= 2**-6 * w.abs().max().item(), (max_abs_diff(g, w), w.abs().max())
    # Whole prompts (16 rows a step): oneDNN on the dequantized copy.
    _, got_logits = run_engine(got, prompts, decode_steps=0)
    _, want_logits = run_engine(want, prompts, decode_steps=0)
    if not native_bf16():  # a float32 copy: the reference's own weights
        for g, w in zip(got_logits, want_logits):
            assert max_abs_diff(g, w) <= 2**-6 * w.abs().max().item(), (max_abs_diff(g, w), w.abs().max())
        return
    # A bfloat16 copy rounds every weight too (half a bfloat16 step), which adds up over the layers, and a
    # router may then pick another expert. What must hold: it stays as close to the float32 model as the
    # reference's quantized model is (the quantization's own error dominates; measured 0.93-1.12x of it).
    assert 0 < deviation(path, got_logits, prompts, None) <= 1.25 * deviation(path, want_logits, prompts, None)


# The VNNI kernel rounds every linear's input to int8 per 32 too, on top of the weights' rounding. Its logits'
# deviation from the float32 model's, as a multiple of the reference's quantized model's, one token a step
# (measured: int8 weights 0.95-1.50x, where the input's rounding is of the weights' size; int4 0.98-1.01x).
VNNI_DEVIATION = {"int8": 2.0, "int4": 1.25}


@pytest.mark.parametrize("arch", ["mistral", "llama", "mixtral", "mistral4"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_vnni_kernel_keeps_a_quantized_model_as_close_to_float32_as_the_reference(tiny, arch, scheme):
    path = tiny(arch)
    got, _ = load_model(path, ModelConfig(quantization=scheme))
    want, _ = load_model(path, ModelConfig(quantization=scheme, linear_backend="reference"))
    forms = [lin.prepared.form for lin in linears_of(got) if lin.prepared is not None]
    if vnni.library() is None:
        pytest.skip("this CPU or machine cannot run the VNNI kernel (the log says why): `cpu` is PyTorch's here")
    assert any(getattr(f, "vnni", None) is not None for f in forms)
    prompts = prompts_of([5, 11], vocab=500)
    _, got_logits = run_engine(got, prompts, decode_steps=0, chunk=1)
    _, want_logits = run_engine(want, prompts, decode_steps=0, chunk=1)
    limit = VNNI_DEVIATION[scheme] * deviation(path, want_logits, prompts, 1)
    assert 0 < deviation(path, got_logits, prompts, 1) <= limit


def deviation(path, logits, prompts, chunk: int | None) -> float:
    """Mean absolute difference of ``logits`` from the float32 model's, summed over the prompts."""
    _, exact = run_engine(load_model(path, ModelConfig(linear_backend="reference"))[0], prompts, decode_steps=0,
                          chunk=chunk)  # fmt: skip
    return sum((g - f).abs().mean().item() for g, f in zip(logits, exact))


def test_what_is_quantized_and_what_stays_as_loaded(tiny):
    by_name = schemes(load_model(tiny("mistral4"), ModelConfig(quantization="int4"))[0])
    assert by_name["lm_head"] == "int8"  # the output head is never below 8 bits
    assert by_name["model.layers.0.self_attn.kv_b_proj"] is None  # absorbed into attention as is
    assert by_name["model.layers.1.mlp.gate"] is None  # the router's choices stay the checkpoint's
    assert by_name["model.layers.0.mlp.gate_up"] == "int4" and by_name["model.layers.0.mlp.gate_proj"] is None
    assert by_name["model.layers.0.self_attn.q_a_proj"] == "int4"
    assert by_name["model.layers.0.self_attn.kv_a_proj_with_mqa"] == "int8"  # 40 rows: int4 cannot pack them
    plain = schemes(load_model(tiny("mistral"), ModelConfig())[0])
    assert set(plain.values()) == {None, "none"}  # nothing quantized


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ModelConfig(quantization="int3"), "quantization: must be one of ('none', 'int8', 'int4')"),
        (lambda: ModelConfig(quantization="int8", device="cuda"), "quantization: 'int8' runs on PyTorch's CPU"),
        (
            lambda: EngineConfig(backend="vllm", model=ModelConfig(quantization="int4")),
            "model.quantization: is the native engine's",
        ),
    ],
)
def test_a_bad_quantization_setting_is_refused_naming_the_field(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value).startswith(message), str(info.value)


def test_int4_weights_take_an_eighth_of_fp32s_bytes_and_the_fused_weight_stays_whole(tiny):
    model, _ = load_model(tiny("mistral"), ModelConfig(quantization="int4", linear_backend="cpu_weight_only"))
    mlp = model.model.layers[0].mlp.gate_up
    assert mlp.prepared.form.weight.numel() * mlp.prepared.form.weight.element_size() == (mlp.weight.numel() // 2)
    assert torch.equal(
        mlp.weight, torch.cat([model.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.up_proj.weight])
    )
