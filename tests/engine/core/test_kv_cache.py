import pytest

from engine.core.kv_cache import KVCacheManager
from tests.engine.core.helpers import make_request

BS = 4


def computed(req, n: int) -> None:
    """What the scheduler does after a successful allocation."""
    req.num_computed_tokens += n


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_allocate_exact_block_ids_and_growth() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    a = make_request("a", list(range(1, 11)))  # 10 tokens -> 3 blocks
    assert ids(kv.allocate_slots(a, 10)) == [1, 2, 3]
    computed(a, 10)
    for expect in ([], [], [4]):  # 11 and 12 tokens fit block 3; the 13th needs block 4
        a.append_output_token_ids(99)
        assert ids(kv.allocate_slots(a, 1)) == expect
        computed(a, 1)
    assert kv.get_block_ids("a") == [1, 2, 3, 4]
    assert (kv.num_free_blocks, kv.num_used_blocks, kv.usage) == (5, 4, pytest.approx(4 / 9))
    kv.free(a)
    assert kv.num_free_blocks == 9 and kv.get_block_ids("a") == []
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9, 4, 3, 2, 1]


def admitted_a(kv: KVCacheManager):
    a = make_request("a", list(range(1, 11)))
    assert kv.get_computed_blocks(a) == ([], 0)
    kv.allocate_slots(a, 10)
    computed(a, 10)
    return a


def test_prefix_hit_shares_exact_blocks() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    a = admitted_a(kv)  # blocks 1, 2 full and cached; 3 partial
    b = make_request("b", list(range(1, 9)) + [100, 101, 102])
    hits, n = kv.get_computed_blocks(b)
    assert ids(hits) == [1, 2] and n == 8
    assert ids(kv.allocate_slots(b, b.num_tokens - n, hits)) == [4]
    assert kv.get_block_ids("b") == [1, 2, 4]
    assert [kv.pool.blocks[i].ref_cnt for i in range(1, 5)] == [2, 2, 1, 1]
    assert (kv.pool.prefix_cache_queries, kv.pool.prefix_cache_hits) == (10 + 11, 8)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 9


def test_prefix_hit_never_covers_last_token() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    admitted_a(kv)
    c = make_request("c", list(range(1, 9)))  # exactly a's two full blocks
    hits, n = kv.get_computed_blocks(c)
    assert ids(hits) == [1] and n == 4  # (8 - 1) // 4 = 1 block: the last token is computed


def test_prompt_logprobs_gets_no_hits() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    admitted_a(kv)
    d = make_request("d", list(range(1, 12)), prompt_logprobs=1)
    assert kv.get_computed_blocks(d) == ([], 0)


def test_hit_on_freed_cached_blocks_revives_them() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    kv.free(admitted_a(kv))
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 3, 2, 1]
    d = make_request("d", list(range(1, 11)))
    hits, n = kv.get_computed_blocks(d)
    assert ids(hits) == [1, 2] and n == 8
    assert ids(kv.allocate_slots(d, 2, hits)) == [4]
    assert kv.get_block_ids("d") == [1, 2, 4]
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9, 3]


def test_failed_allocation_changes_nothing() -> None:
    kv = KVCacheManager(BS, num_blocks=5, max_model_len=64)  # 4 usable
    kv.free(admitted_a(kv))  # blocks 1, 2 free but cached
    other = make_request("o", [7] * 4)
    kv.allocate_slots(other, 4)  # takes block 4
    e = make_request("e", list(range(1, 9)) + [50] * 8)  # 16 tokens: hits 1, 2 + needs 2 new
    hits, _n = kv.get_computed_blocks(e)
    assert ids(hits) == [1, 2]
    before = (kv.pool.free_block_ids(), [b.ref_cnt for b in kv.pool.blocks], kv.pool.prefix_cache_queries)
    assert kv.allocate_slots(e, 8, hits) is None  # 2 revived + 2 new > 3 free
    assert (kv.pool.free_block_ids(), [b.ref_cnt for b in kv.pool.blocks], kv.pool.prefix_cache_queries) == before
    assert kv.get_block_ids("e") == []


def test_blocks_become_cached_when_they_fill() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    a = make_request("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    computed(a, 3)
    assert kv.pool.blocks[1].block_hash is None  # 3 of 4 slots
    a.append_output_token_ids(4)
    kv.allocate_slots(a, 1)
    assert kv.pool.blocks[1].block_hash == a.block_hashes[0]


def test_caching_disabled_no_hits() -> None:
    kv = KVCacheManager(BS, num_blocks=10, enable_caching=False, max_model_len=64)
    admitted_a(kv)
    b = make_request("b", list(range(1, 11)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert ids(kv.allocate_slots(b, 10)) == [4, 5, 6]
    assert kv.pool.prefix_cache_queries == 0


def test_max_model_len_enforced() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=8)
    with pytest.raises(ValueError, match="^max_model_len: request a needs 9 slots, limit 8"):
        kv.allocate_slots(make_request("a", list(range(9))), 9)
