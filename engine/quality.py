"""What quantization costs: perplexity on a fixed text, the figure ``levante bench`` prints beside tokens/s
(with greedy agreement against the first backend)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata

# Plain prose, written for this benchmark, so no model has seen it verbatim.
FIXED_TEXT = (
    "The harbour town woke slowly in winter. Fishing boats stayed tied to the quay while the wind "
    "pushed grey water against the stones, and the baker opened an hour later than in summer. "
    "Children walked to school along the sea wall, counting the gulls that stood facing the weather. "
    "By noon the market square filled with people buying bread, onions and dried fish, and the old "
    "men who had once sailed to the northern banks argued about the price of diesel and the size of "
    "this year's catch. In the afternoon the light failed early. Lamps came on in the kitchens above "
    "the shops, the church bell rang four times, and the ferry from the island crossed the bay with "
    "its deck almost empty. Nobody in the town thought of it as a hard season. It was simply the "
    "part of the year when the sea decided what could be done, and everyone else waited for spring."
)


@torch.inference_mode()
def perplexity(model, token_ids: list[int], block_size: int = 16) -> float:
    """exp(mean negative log-likelihood) of each token after the first, in one causal prefill."""
    n = len(token_ids)
    blocks = -(-n // block_size)
    caches = model.allocate_kv_cache(blocks + 1, block_size)  # block 0 is the null block
    meta = AttentionMetadata.build(block_size, [n], [n], [list(range(1, blocks + 1))], model.device)
    ids = torch.tensor(token_ids, device=model.device)  # [n]
    hidden = model(ids, torch.arange(n, device=model.device), meta, caches)  # [n, hidden]
    logits = model.compute_logits(hidden)  # [n, V]
    return math.exp(F.cross_entropy(logits[:-1].float(), ids[1:]).item())
