"""Token bitmasks on logits: constrained decoding's per-step op (``engine.structured`` fills the masks)."""

from kernels.bitmask.cpu import apply_token_bitmask_

__all__ = ["apply_token_bitmask_"]
