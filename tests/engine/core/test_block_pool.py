import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.block_pool import BlockPool, compute_block_hashes, hash_block_tokens


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_allocate_exact_ids_and_lru_free_order() -> None:
    pool = BlockPool(6)  # block 0 is the null block: 5 usable
    a = pool.get_new_blocks(3)
    assert ids(a) == [1, 2, 3] and [b.ref_cnt for b in a] == [1, 1, 1]
    assert pool.num_free_blocks == 2 and pool.usage == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="^n: cannot allocate 3 blocks, only 2 free"):
        pool.get_new_blocks(3)
    pool.free_blocks(reversed(a))  # tail first
    assert pool.free_block_ids() == [4, 5, 3, 2, 1]
    assert ids(pool.get_new_blocks(3)) == [4, 5, 3]
    assert pool.free_block_ids() == [2, 1]


def test_allocation_evicts_least_recently_freed_cached_block() -> None:
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)
    hashes = compute_block_hashes(list(range(12)), 4)
    pool.cache_full_blocks(a, hashes)
    assert [b.block_hash for b in a] == hashes
    pool.free_blocks(reversed(a))
    assert all(pool.get_cached_block(h) is b for h, b in zip(hashes, a))  # free but still cached
    got = pool.get_new_blocks(3)
    assert ids(got) == [4, 5, 3]  # uncached free blocks first, then the sequence's tail
    assert got[2].block_hash is None and pool.get_cached_block(hashes[2]) is None
    assert pool.get_cached_block(hashes[0]) is a[0] and pool.get_cached_block(hashes[1]) is a[1]


def test_touch_revives_free_block_and_free_appends_to_tail() -> None:
    pool = BlockPool(5)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, [11, 22])
    pool.free_blocks(reversed(a))
    assert pool.free_block_ids() == [3, 4, 2, 1]
    pool.touch([a[0]])
    assert a[0].ref_cnt == 1 and pool.free_block_ids() == [3, 4, 2]
    pool.touch([a[0]])  # a second holder of a shared prefix block
    assert a[0].ref_cnt == 2
    pool.free_blocks([a[0]])
    assert a[0].ref_cnt == 1 and pool.free_block_ids() == [3, 4, 2]
    pool.free_blocks([a[0]])
    assert pool.free_block_ids() == [3, 4, 2, 1]


def test_duplicate_content_keeps_first_registration() -> None:
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_blocks([a], [7])
    pool.cache_full_blocks([b], [7])
    assert pool.get_cached_block(7) is a and b.block_hash is None


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(4, enable_caching=False)
    a = pool.get_new_blocks(1)
    pool.cache_full_blocks(a, [7])
    assert pool.get_cached_block(7) is None and a[0].block_hash is None


def test_reset_prefix_cache_refused_while_blocks_held() -> None:
    pool = BlockPool(4)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, [1, 2])
    assert pool.reset_prefix_cache() is False and pool.get_cached_block(1) is a[0]
    pool.free_blocks(reversed(a))
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(1) is None and all(b.block_hash is None for b in pool.blocks)


def test_hashes_chain_and_extend_incrementally() -> None:
    tokens = list(range(10))
    h = compute_block_hashes(tokens, 4)
    assert len(h) == 2  # the partial third block is not hashed
    assert h[0] == hash_block_tokens(None, [0, 1, 2, 3])
    assert h[1] == hash_block_tokens(h[0], [4, 5, 6, 7]) != hash_block_tokens(None, [4, 5, 6, 7])
    assert hash_block_tokens(None, [1, 2], extra_keys=("lora",)) != hash_block_tokens(None, [1, 2])
    tokens += [10, 11, 12]
    same = compute_block_hashes(tokens, 4, h)
    assert same is h and h == compute_block_hashes(tokens, 4) and len(h) == 3


def test_hash_is_stable_across_processes() -> None:
    code = "from engine.core.block_pool import hash_block_tokens as h; print(h(h(None, [1, 2, 3]), [4, 5, 6]))"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=Path(__file__).resolve().parents[3],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        outs.add(int(r.stdout))
    assert outs == {hash_block_tokens(hash_block_tokens(None, [1, 2, 3]), [4, 5, 6])}
