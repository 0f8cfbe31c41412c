"""Routers reproduce transformers' MixtralTopKRouter and Mistral4TopkRouter (ids as sets, weights per id)."""

from __future__ import annotations

import pytest
import torch

from kernels.moe.routing import route_grouped_topk, route_softmax_topk


def _by_id(ids: torch.Tensor, weights: torch.Tensor) -> list[dict[int, float]]:
    return [dict(zip(i.tolist(), w.float().tolist())) for i, w in zip(ids, weights)]


def _assert_same_routing(ids, weights, hf_ids, hf_weights, exact=True):
    assert ids.dtype == torch.int64 and weights.dtype == hf_weights.dtype
    assert [set(r) for r in ids.tolist()] == [set(r) for r in hf_ids.tolist()]
    ours, theirs = _by_id(ids, weights), _by_id(hf_ids, hf_weights)
    for a, b in zip(ours, theirs):
        for e in a:
            assert a[e] == b[e] if exact else abs(a[e] - b[e]) < 1e-6, (e, a, b)


def _run_hf_router(router, num_experts: int, num_tokens: int, dtype: torch.dtype, seed: int):
    """Random router weights and hidden states (hidden size 16) through a transformers router."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, 16, generator=gen))
    router = router.to(dtype)
    x = torch.randn(num_tokens, 16, generator=gen).to(dtype)
    with torch.no_grad():
        return router(x)  # logits, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_topk_matches_mixtral_router(dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
    logits, hf_weights, hf_ids = _run_hf_router(MixtralTopKRouter(config), 8, 37, dtype, seed=0)
    weights, ids = route_softmax_topk(logits, top_k=2, renormalize=True)
    assert weights.dtype == torch.float32  # softmax in float32, never cast back
    _assert_same_routing(ids, weights, hf_ids, hf_weights)


def test_softmax_topk_without_renormalize():
    logits = torch.randn(5, 8)
    weights, ids = route_softmax_topk(logits, top_k=3, renormalize=False)
    torch.testing.assert_close(weights, torch.softmax(logits, -1).gather(1, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_group,topk_group,norm,scale", [(4, 2, True, 2.5), (1, 1, True, 1.0), (8, 3, False, 1.5)])
def test_grouped_topk_matches_mistral4_router(dtype, n_group, topk_group, norm, scale):
    from transformers import Mistral4Config
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    config = Mistral4Config(
        hidden_size=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    logits, hf_weights, hf_ids = _run_hf_router(Mistral4TopkRouter(config), 16, 41, dtype, seed=1)
    weights, ids = route_grouped_topk(
        logits, top_k=4, n_group=n_group, topk_group=topk_group, renormalize=norm, routed_scaling_factor=scale
    )
    assert weights.dtype == dtype  # Mistral 4 keeps the logits' dtype through softmax
    _assert_same_routing(ids, weights, hf_ids, hf_weights)


def test_grouped_topk_only_picks_from_best_groups():
    logits = torch.full((1, 8), -10.0)
    logits[0, [0, 1]] = 5.0  # group 0: strong pair
    logits[0, 2] = 5.1  # group 1: the single strongest expert, weak partner
    logits[0, [4, 5]] = 4.5  # group 2: decent pair
    _, ids = route_grouped_topk(logits, top_k=3, n_group=4, topk_group=2, renormalize=True)
    # groups scored by top-2 sums: g0 = 2e^5 (297), g2 = 2e^4.5 (180) beat g1 = e^5.1 (164) -> expert 2 excluded
    assert set(ids[0].tolist()) <= {0, 1, 4, 5} and {0, 1} <= set(ids[0].tolist())
