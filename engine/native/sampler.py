"""Token sampling for one step's batch of logits rows.

Greedy rows take the argmax. Other rows apply temperature, then top-k,
top-p and min-p, and draw with the exponential-race trick
(``argmax(p / E)`` with ``E ~ Exp(1)`` picks index i with probability p_i).
A request with a seed draws its noise from a generator seeded by
(seed, output index), so its tokens do not depend on the batch it shares a
step with, nor on being preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.core.request import MIN_TEMPERATURE, SamplingParams
from kernels.bitmask import apply_token_bitmask_

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, step) pairs over the generator's seed space


@dataclass
class SampleRow:
    params: SamplingParams
    output_index: int  # how many tokens the request has produced so far
    banned_token_ids: tuple[int, ...] = ()
    allowed: np.ndarray | None = None  # [ceil(V/32)] int32 bitmask of the tokens a grammar allows; None: all


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        # noise is drawn where the logits are: a generator serves only its own device
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
        # logits: [N, V] float32 on self.device, one row per request that samples this step
        logits = self._apply_bans(logits, rows)
        if all(r.params.greedy for r in rows):
            return logits.argmax(dim=-1).tolist()
        out: list[int] = []
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            out.append(greedy[i] if row.params.greedy else self._sample_row(logits[i], row))
        return out

    @staticmethod
    def _apply_bans(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        masked = [i for i, r in enumerate(rows) if r.allowed is not None]
        if not masked and not any(r.banned_token_ids for r in rows):
            return logits
        logits = logits.clone()  # the step's raw logits stay as they are, for logprobs
        for i, row in enumerate(rows):
            if row.banned_token_ids:
                logits[i, list(row.banned_token_ids)] = float("-inf")
        if masked:  # only the constrained rows: the others keep their logits bit for bit
            bitmask = torch.from_numpy(np.stack([rows[i].allowed for i in masked]))  # [R, W] int32
            apply_token_bitmask_(logits, bitmask, torch.tensor(masked, dtype=torch.int64))
        return logits

    def _sample_row(self, logits: torch.Tensor, row: SampleRow) -> int:
        # logits: [V]
        probs = filtered_probs(logits, row.params)
        if row.params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(
                (row.params.seed * _SEED_MIX + row.output_index) % (2**63)
            )
        else:
            gen = self._generator
        noise = torch.empty_like(probs).exponential_(generator=gen)
        return int(torch.argmax(probs / noise))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p. logits: [V] -> [V]."""
    # Floored here too (float32 turns 1e-300 into 0, and 0/0 is NaN), and shifted so the largest logit is
    # 0: a small temperature then sends the others to -inf, never the largest to inf (inf - inf is NaN).
    logits = logits.float()
    logits = (logits - logits.max()) / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> tuple[list[float], list[dict[int, float]]]:
    """Log-probabilities of the chosen tokens and each row's top-k. logits: [N, V]; token_ids: [N]."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = lp.gather(1, token_ids.view(-1, 1)).squeeze(1).tolist()
    tops: list[dict[int, float]] = [{} for _ in range(lp.shape[0])]
    if k > 0:
        vals, idx = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
        tops = [dict(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return chosen, tops
