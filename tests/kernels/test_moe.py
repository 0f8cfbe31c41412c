"""Fused MoE: CPU vs reference, expert-parallel slicing, and the weight layout against transformers' experts."""

from __future__ import annotations

import pytest
import torch

from kernels.backend import MoEBackend, get_moe_backend
from kernels.moe import panels
from kernels.moe.routing import route_softmax_topk

REF = get_moe_backend("reference")
CPU = get_moe_backend("cpu")
E, D, I, K = 8, 16, 12, 2  # I is no whole number of panels: the oneDNN path
PANEL_SIZES = (32, 48)  # (D, I): whole panels, the C kernel where it loads


def _problem(num_tokens=13, dtype=torch.float32, seed=0, num_experts=E, top_k=K, sizes=(D, I)):
    gen = torch.Generator().manual_seed(seed)
    d, i = sizes
    x = torch.randn(num_tokens, d, generator=gen).to(dtype)  # [T, D]
    w_gate_up = (torch.randn(num_experts, 2 * i, d, generator=gen) * d**-0.5).to(dtype)  # [E, 2I, D]
    w_down = (torch.randn(num_experts, d, i, generator=gen) * i**-0.5).to(dtype)  # [E, D, I]
    weights, ids = route_softmax_topk(torch.randn(num_tokens, num_experts, generator=gen), top_k, True)
    return x, ids, weights, w_gate_up, w_down


def test_factory():
    assert isinstance(CPU, MoEBackend) and CPU.name == "cpu" and REF.name == "reference"
    assert get_moe_backend().name == "cpu"
    with pytest.raises(ValueError, match="cpu"):
        get_moe_backend("nope")


@pytest.mark.parametrize("num_tokens", [1, 3, 40])
def test_cpu_matches_reference(num_tokens):
    x, ids, w, gu, dn = _problem(num_tokens)
    got = CPU.fused_moe(x, ids, w, CPU.prepare(gu, dn))
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, REF.fused_moe(x, ids, w, REF.prepare(gu, dn)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("vendor", "onednn"), [("AuthenticAMD", True), ("GenuineIntel", False)])
def test_cpu_experts_run_onednn_where_dense_matmuls_do_from_one_row(vendor, onednn, as_vendor, onednn_calls):
    as_vendor(vendor)
    x, ids, w, gu, dn = _problem(3)
    experts = CPU.prepare(gu, dn)
    packs = onednn and torch.backends.mkldnn.is_available()
    assert (experts.packed is not None) == packs and experts.gate_up is gu and experts.down is dn
    got = CPU.fused_moe(x, ids, w, experts)
    hit = len(set(ids.reshape(-1).tolist()))
    assert len(onednn_calls) == (2 * hit if packs else 0)
    torch.testing.assert_close(got, REF.fused_moe(x, ids, w, REF.prepare(gu, dn)), atol=1e-6, rtol=1e-5)


def test_reference_is_the_formula():
    x, ids, w, gu, dn = _problem(2)
    t, k = 1, 1
    e = int(ids[t, k])
    gate, up = gu[e, :I] @ x[t], gu[e, I:] @ x[t]
    one = w[t, k] * (dn[e] @ (torch.nn.functional.silu(gate) * up))
    only = torch.zeros_like(w)
    only[t, k] = w[t, k]
    torch.testing.assert_close(REF.fused_moe(x, ids, only, REF.prepare(gu, dn))[t], one)


def _needs_panels() -> None:
    if panels.library() is None:
        pytest.skip("the C routed experts cannot run on this machine (the warning above says why)")


@pytest.mark.parametrize("num_tokens", [1, 3, 40])  # 40 tokens: more than 8 rows for some experts
def test_panels_match_reference(num_tokens, onednn_calls):
    _needs_panels()
    x, ids, w, gu, dn = _problem(num_tokens, sizes=PANEL_SIZES)
    experts = CPU.prepare(gu, dn)
    assert experts.panels is not None and experts.packed is None
    got = CPU.fused_moe(x, ids, w, experts)
    assert got.shape == x.shape and got.dtype == x.dtype and onednn_calls == []
    torch.testing.assert_close(got, REF.fused_moe(x, ids, w, REF.prepare(gu, dn)), atol=1e-6, rtol=1e-5)


def test_panels_lay_each_output_in_its_lane():
    gu = torch.arange(2 * 48 * 32, dtype=torch.float32).view(1, 96, 32)  # [E=1, 2I, D]
    dn = torch.arange(32 * 48, dtype=torch.float32).view(1, 32, 48)  # [E=1, D, I]
    packed = panels.pack(gu, dn)
    assert packed.gate_up.shape == (1, 6, 32, 16) and packed.down.shape == (1, 2, 48, 16)
    assert packed.gate_up[0, 5, 7, 3] == gu[0, 5 * 16 + 3, 7] and packed.down[0, 1, 40, 9] == dn[0, 25, 40]


def test_experts_that_are_not_whole_panels_run_onednn_or_torch():
    _, _, _, gu, dn = _problem(2)
    assert not panels.fits(gu, dn) and CPU.prepare(gu, dn).panels is None
    _, _, _, gu, dn = _problem(2, sizes=PANEL_SIZES)
    assert panels.fits(gu, dn) and not panels.fits(gu.bfloat16(), dn.bfloat16())


@pytest.mark.parametrize("sizes", [(D, I), PANEL_SIZES], ids=["onednn", "panels"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("num_tokens", [1, 17])  # one token: the CPU backend's path without sort and scatter
def test_expert_parallel_halves_sum_to_full(backend, num_tokens, sizes):
    impl = get_moe_backend(backend)
    x, ids, w, gu, dn = _problem(num_tokens, sizes=sizes)
    full = impl.fused_moe(x, ids, w, impl.prepare(gu, dn))
    half = E // 2
    lo = impl.fused_moe(x, ids, w, impl.prepare(gu[:half], dn[:half]), expert_start=0)
    hi = impl.fused_moe(x, ids, w, impl.prepare(gu[half:], dn[half:]), expert_start=half)
    torch.testing.assert_close(lo + hi, full, atol=1e-6, rtol=1e-5)
    # A rank whose experts no token picked contributes exactly zero.
    none = impl.fused_moe(x, torch.zeros_like(ids), w, impl.prepare(gu[half:], dn[half:]), expert_start=half)
    assert torch.equal(none, torch.zeros_like(x))


@pytest.mark.parametrize("sizes", [(D, I), PANEL_SIZES], ids=["onednn", "panels"])
@pytest.mark.parametrize("num_tokens", [1, 29])
def test_expert_parallel_uneven_slices_cpu_vs_reference(num_tokens, sizes):
    x, ids, w, gu, dn = _problem(num_tokens, num_experts=16, top_k=4, seed=2, sizes=sizes)
    for start, stop in [(0, 3), (3, 10), (10, 16)]:
        got = CPU.fused_moe(x, ids, w, CPU.prepare(gu[start:stop], dn[start:stop]), start)
        want = REF.fused_moe(x, ids, w, REF.prepare(gu[start:stop], dn[start:stop]), start)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 21])
def test_cpu_matches_reference_bf16(num_tokens):
    x, ids, w, gu, dn = _problem(num_tokens, dtype=torch.bfloat16)
    got = CPU.fused_moe(x, ids, w, CPU.prepare(gu, dn))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), REF.fused_moe(x, ids, w, REF.prepare(gu, dn)).float(), atol=2e-2, rtol=2e-2)


def test_matches_transformers_mixtral_sparse_block():
    """Router + experts of MixtralSparseMoeBlock == route_softmax_topk + fused_moe with its stacked weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    block = MixtralSparseMoeBlock(config).eval()
    x, _, _, gu, dn = _problem(9)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(E, D))
        block.experts.gate_up_proj.copy_(gu)
        block.experts.down_proj.copy_(dn)
        expected = block(x[None])[0]
    weights, ids = route_softmax_topk(x @ block.gate.weight.detach().T, K, renormalize=True)
    for impl in (REF, CPU):
        torch.testing.assert_close(
            impl.fused_moe(x, ids, weights, impl.prepare(gu, dn)), expected, atol=1e-5, rtol=1e-5
        )
