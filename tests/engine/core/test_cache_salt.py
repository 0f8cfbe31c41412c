"""Prefix-cache salts: requests reuse cached blocks only of requests with the same salt."""

from __future__ import annotations

import pytest

from engine.core.block_pool import compute_block_hashes, hash_block_tokens
from engine.core.kv_cache import KVCacheManager
from engine.core.request import SamplingParams
from tests.engine.core.helpers import make_request, make_scheduler

BS = 4
PROMPT = list(range(1, 11))  # 10 tokens: blocks 1, 2 full, block 3 partial


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def admitted(kv: KVCacheManager, rid: str, **sp: object):
    req = make_request(rid, PROMPT, **sp)
    hits, n = kv.get_computed_blocks(req)
    kv.allocate_slots(req, req.num_tokens - n, hits)
    req.num_computed_tokens += req.num_tokens
    return req


def test_salt_changes_the_first_hash_and_every_later_one() -> None:
    plain = compute_block_hashes(PROMPT, BS)
    salted = compute_block_hashes(PROMPT, BS, salt="tenant-a")
    assert salted[0] == hash_block_tokens(None, PROMPT[:4], ("tenant-a",))
    assert salted[1] == hash_block_tokens(salted[0], PROMPT[4:8])  # only the chain carries the salt on
    assert all(s != p for s, p in zip(salted, plain, strict=True))
    assert compute_block_hashes(PROMPT, BS, salt="tenant-b")[0] != salted[0]
    assert compute_block_hashes(PROMPT, BS, salt="tenant-a") == salted  # stable: the same salt hits


def test_other_salt_misses_and_allocates_fresh_blocks() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    admitted(kv, "a", cache_salt="tenant-a")  # blocks 1, 2 cached under a's salt; 3 partial
    b = make_request("b", PROMPT, cache_salt="tenant-b")
    assert kv.get_computed_blocks(b) == ([], 0)
    assert ids(kv.allocate_slots(b, b.num_tokens)) == [4, 5, 6]
    unsalted = make_request("u", PROMPT)
    assert kv.get_computed_blocks(unsalted) == ([], 0)  # no salt is a namespace of its own


def test_same_salt_hits_the_exact_blocks() -> None:
    kv = KVCacheManager(BS, num_blocks=10, max_model_len=64)
    a = admitted(kv, "a", cache_salt="tenant-a")
    assert kv.pool.blocks[1].block_hash == a.block_hashes[0] == hash_block_tokens(None, PROMPT[:4], ("tenant-a",))
    again = make_request("a2", PROMPT, cache_salt="tenant-a")
    hits, n = kv.get_computed_blocks(again)
    assert ids(hits) == [1, 2] and n == 8
    assert ids(kv.allocate_slots(again, again.num_tokens - n, hits)) == [4]


def test_salted_blocks_share_the_pool_after_they_are_freed() -> None:
    """A free salted block is evicted like any other: salting never holds memory back."""
    kv = KVCacheManager(BS, num_blocks=4, max_model_len=64)  # 3 usable
    kv.free(admitted(kv, "a", cache_salt="tenant-a"))
    b = make_request("b", PROMPT, cache_salt="tenant-b")
    assert ids(kv.allocate_slots(b, b.num_tokens)) == [3, 2, 1]  # a's tail first, as ever


def test_scheduler_reports_cached_tokens_per_salt() -> None:
    sched = make_scheduler(block_size=BS, num_blocks=16)
    for rid, salt in (("a", "x"), ("b", "y"), ("c", "x")):
        sched.add_request(make_request(rid, PROMPT, cache_salt=salt, max_tokens=1))
    sched.schedule()
    got = {rid: sched.requests[rid].num_cached_tokens for rid in "abc"}
    assert got == {"a": 0, "b": 0, "c": 8}


@pytest.mark.parametrize("salt", [7, ""])
def test_salt_must_be_a_non_empty_string(salt: object) -> None:
    with pytest.raises(ValueError, match="^cache_salt: must be a non-empty string or None"):
        SamplingParams(cache_salt=salt)  # type: ignore[arg-type]
