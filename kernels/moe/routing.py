"""Router functions: turn router logits into (topk_weights, topk_ids).

Both reproduce transformers 5.x bit for bit (same ops, same order, same dtypes):

* ``route_softmax_topk``  -- Mixtral (``MixtralTopKRouter``): softmax in float32,
  top-k, renormalize. Weights come back **float32** whatever the logits dtype.
* ``route_grouped_topk``  -- Mistral 4 / DeepSeek-V3 style (``Mistral4TopkRouter``):
  softmax in the **logits' own dtype** (bf16 logits -> bf16 probabilities),
  groups scored by the sum of their two best experts, only the ``topk_group``
  best groups compete, weights gathered from the unmasked probabilities,
  optional renormalization (+1e-20), then times ``routed_scaling_factor``.
  Weights come back in the logits' dtype.

``topk_ids`` are int64 global expert ids; the order of the K ids within a row
is whatever ``torch.topk`` yields (the grouped router uses ``sorted=False`` like
transformers), so compare ids as sets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def route_softmax_topk(router_logits: Tensor, top_k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Mixtral routing. router_logits: [T, E] -> (topk_weights [T, K] float32, topk_ids [T, K] int64)"""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E] float32
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def route_grouped_topk(
    router_logits: Tensor,
    top_k: int,
    n_group: int | None,
    topk_group: int | None,
    renormalize: bool,
    routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Group-limited routing (Mistral 4). router_logits: [T, E] -> (weights [T, K] logits dtype, ids [T, K] int64)

    ``n_group`` / ``topk_group`` of None mean one group (no group limit).
    """
    num_tokens, num_experts = router_logits.shape
    n_group = n_group or 1
    topk_group = topk_group or n_group
    assert num_experts % n_group == 0, (num_experts, n_group)
    per_group = num_experts // n_group
    scores = router_logits.softmax(-1)  # [T, E], stays in the logits dtype (as transformers)
    group_scores = scores.view(num_tokens, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, G]
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(num_tokens, num_experts)  # [T, E]
    scores_for_choice = scores.masked_fill(~score_mask.bool(), 0.0)  # [T, E]
    topk_ids = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]  # [T, K]
    topk_weights = scores.gather(1, topk_ids)  # [T, K]
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids
