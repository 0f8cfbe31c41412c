"""Per-request block lists on top of the BlockPool: prefix hits, growth, release.

A request's blocks cover its computed tokens in order: token ``p`` lives in
``blocks[p // block_size]`` at offset ``p % block_size``.

With a sliding window ``W`` a query at position ``q`` sees keys ``q - W < k <= q``.
Once a request's next query starts at ``s = num_computed_tokens``, no future
query sees a position below ``s - W + 1``: the blocks wholly below it go back
to the pool and the null block takes their place in the request's list, so
positions still map to blocks. A request then holds about ``W + chunk``
tokens of blocks, however long it grows.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.core.block_pool import BlockPool, KVCacheBlock, compute_block_hashes
from engine.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def window_fits(num_blocks: int, block_size: int, sliding_window: int | None) -> bool:
    """Whether a request alone always fits the cache however long it grows:
    its window's ``W - 1`` keys plus one token, at any block alignment."""
    return sliding_window is not None and (num_blocks - 2) * block_size - sliding_window + 2 >= 1


class KVCacheManager:
    def __init__(
        self,
        block_size: int,
        num_blocks: int,
        enable_caching: bool = True,
        max_model_len: int | None = None,
        sliding_window: int | None = None,
    ) -> None:
        """``sliding_window``: the model's attention window (None: full attention, nothing is dropped)."""
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window: must be >= 1 or None, got {sliding_window}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request are already registered in the
        # prefix cache (or were skipped as duplicates), so each is done once.
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - 1 - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_skipped_blocks(self, num_computed_tokens: int) -> int:
        """Leading blocks no query at a position ``>= num_computed_tokens`` sees
        (positions below ``num_computed_tokens - W + 1``); 0 without a window."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size

    def max_chunk_tokens(self, num_computed_tokens: int) -> int:
        """Most tokens a request at ``num_computed_tokens`` may compute next
        and still fit the cache alone, its skipped blocks given back. Never
        binds for a sequence within the cache; at least 1 when the window fits."""
        usable = self.pool.num_blocks - 1 + self.num_skipped_blocks(num_computed_tokens)
        return usable * self.block_size - num_computed_tokens

    def _free_skipped_blocks(self, request: Request, blocks: list[KVCacheBlock]) -> None:
        """Return the blocks the window left behind to the pool; the null block
        keeps their place. Null entries are always a prefix of ``blocks``, so
        walking back from the last skipped one stops at the first null."""
        null = self.pool.null_block
        i = min(self.num_skipped_blocks(request.num_computed_tokens), len(blocks))
        dropped = []
        while i > 0 and blocks[i - 1] is not null:
            i -= 1
            dropped.append(blocks[i])  # tail first, as free_blocks wants
            blocks[i] = null
        self.pool.free_blocks(dropped)

    def _block_hashes(self, request: Request) -> list[int]:
        salt = request.sampling_params.cache_salt
        return compute_block_hashes(request.all_token_ids, self.block_size, request.block_hashes, salt)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks from the start of the request.

        Returns (blocks, num_hit_tokens). Never covers the last token: it must
        be computed to get logits to sample from.
        """
        # prompt_logprobs needs logits at every prompt position, so no skipping.
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for h in self._block_hashes(request)[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] = ()
    ) -> list[KVCacheBlock] | None:
        """Grow the request's blocks to hold its computed tokens, the prefix
        hits and ``num_new_tokens`` more, after dropping the blocks its
        sliding window left behind. Returns the newly allocated blocks, or
        None when the pool is short: then nothing changed but that drop."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        assert not new_computed_blocks or not blocks, "prefix hits only on a request's first allocation"
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ValueError(f"max_model_len: request {rid} needs {total} slots, limit {self.max_model_len}")
        self._free_skipped_blocks(request, blocks)
        # Hits the window already left behind are not taken: the null block stands in for them.
        num_skipped_hits = min(self.num_skipped_blocks(num_computed), len(new_computed_blocks))
        hits = list(new_computed_blocks[num_skipped_hits:])
        num_new_blocks = max(0, cdiv(total, self.block_size) - len(blocks) - len(new_computed_blocks))
        # Hits sitting in the free queue leave it on touch: they cost free blocks too.
        num_revived = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return None
        # Touch before allocating so allocation cannot evict a hit.
        self.pool.touch(hits)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        blocks = self.req_to_blocks.setdefault(rid, blocks)
        blocks.extend([self.pool.null_block] * num_skipped_hits)
        blocks.extend(hits)
        blocks.extend(new_blocks)
        if request.num_computed_tokens == 0 and self.enable_caching:
            # Counted here, on a successful (re)admission, not in
            # get_computed_blocks: an admission retried after a failed
            # allocation must not count twice.
            self.pool.record_prefix_query(request.num_tokens, len(new_computed_blocks) * self.block_size)
        self._cache_full_blocks(request, blocks, total)
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Register blocks that are full once the first ``num_tokens`` tokens
        are computed. Done at schedule time: the runner writes a step's KV
        before attention reads it, so a request admitted later in the same
        step may already hit these blocks."""
        if not self.enable_caching:
            return
        rid = request.request_id
        start = self._num_cached_blocks.get(rid, 0)
        num_full = num_tokens // self.block_size
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        self.pool.cache_full_blocks(blocks[start:num_full], hashes[start:num_full])
        self._num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Release all of the request's blocks now, tail first (see BlockPool.free_blocks).
        Null entries (blocks the window already dropped) are not freed twice."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(b for b in reversed(blocks) if b is not self.pool.null_block)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
