"""Per-request block lists on top of the BlockPool: prefix hits, growth, release.

A request's blocks cover its computed tokens in order: token ``p`` lives in
``blocks[p // block_size]`` at offset ``p % block_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.core.block_pool import BlockPool, KVCacheBlock, compute_block_hashes
from engine.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, block_size: int, num_blocks: int, enable_caching: bool = True, max_model_len: int | None = None
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
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

    def _block_hashes(self, request: Request) -> list[int]:
        return compute_block_hashes(request.all_token_ids, self.block_size, request.block_hashes)

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
        hits and ``num_new_tokens`` more. Returns the newly allocated blocks,
        or None, with nothing changed, when the pool is short."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        assert not new_computed_blocks or not blocks, "prefix hits only on a request's first allocation"
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ValueError(f"max_model_len: request {rid} needs {total} slots, limit {self.max_model_len}")
        num_new_blocks = max(0, cdiv(total, self.block_size) - len(blocks) - len(new_computed_blocks))
        # Hits sitting in the free queue leave it on touch: they cost free blocks too.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return None
        # Touch before allocating so allocation cannot evict a hit.
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        blocks = self.req_to_blocks.setdefault(rid, blocks)
        blocks.extend(new_computed_blocks)
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
        """Release all of the request's blocks now, tail first (see BlockPool.free_blocks)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
