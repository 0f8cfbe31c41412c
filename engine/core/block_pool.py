"""Physical KV blocks: ref counts, an LRU free queue and the prefix-cache map.

A block is either held (ref_cnt > 0, by one request or, for a cached prefix,
by several) or free (ref_cnt == 0, in the free queue). A free block may still
carry its hash: its KV stays valid and a later request can revive it with
``touch`` until allocation evicts it.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NULL_BLOCK_ID = 0  # reserved: block tables are padded with it, never handed out


@dataclass(eq=False)  # identity semantics: two blocks are never "equal"
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and registered

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], extra_keys: tuple | None = None) -> int:
    """Hash of one full block, chained on its parent's so equal hashes mean
    equal prefixes. Stable across processes (unlike ``hash()``)."""
    h = hashlib.blake2b(digest_size=8)
    # Tag byte keeps "no parent" apart from any parent value.
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    if extra_keys is not None:
        h.update(repr(extra_keys).encode())
    return int.from_bytes(h.digest(), "little")


def compute_block_hashes(
    token_ids: Sequence[int], block_size: int, start_hashes: list[int] | None = None, salt: str | None = None
) -> list[int]:
    """Hashes of every full block of ``token_ids``.

    ``start_hashes`` (hashes of the leading blocks, e.g. a request's cached
    list) is extended IN PLACE and returned, so only new full blocks get hashed.
    ``salt`` goes into the first block's hash only: the chain carries it to
    every later block, so requests with different salts never share a block.
    """
    hashes = [] if start_hashes is None else start_hashes
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i > 0 else None
        extra = (salt,) if salt is not None and i == 0 else None
        hashes.append(hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], extra))
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks: must be at least 2 (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        # Front = freed longest ago = evicted first. Keyed by id for O(1) removal on touch.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[int, KVCacheBlock] = {}  # block_hash -> block holding that KV
        # Prefix-cache counters, in tokens, for a hit rate.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the non-null blocks held by requests."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def free_block_ids(self) -> list[int]:
        """Free queue, front (next to be allocated) first. For tests and debugging."""
        return list(self._free)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self._free):
            raise ValueError(f"n: cannot allocate {n} blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-hit blocks, reviving free ones."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference. Pass a request's blocks tail-first so, among
        equally old frees, a sequence's tail is evicted before its head."""
        for b in blocks:
            assert b.ref_cnt > 0 and b.block_id != NULL_BLOCK_ID, b
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = b

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[int]) -> None:
        """Register newly full blocks under their hashes (pairwise)."""
        if not self.enable_caching:
            return
        for block, h in zip(blocks, block_hashes, strict=True):
            if block is self.null_block:
                continue  # stands in for a block the sliding window dropped: it holds nothing
            # Already registered (a prefix hit), or another block computed the
            # same content first: keep the existing entry, this copy stays private.
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    def reset_prefix_cache(self) -> bool:
        """Forget every hash (e.g. after a weight update). Refused (False)
        while any block is held: running requests would keep registering
        blocks computed partly from stale KV."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for b in self.blocks:
            b.block_hash = None
        self._cached.clear()
        return True
