"""Sliding window: blocks behind every future query's window go back to the
pool, the null block 0 keeps their place, and a request needs only its
window plus its chunk, so a prompt longer than the cache is served.

Block size 4, window 8: a query at position q sees keys q-7 .. q, so once the
next query is at s, blocks wholly below s - 7 are dropped.
"""

import pytest

from engine.core.kv_cache import KVCacheManager, window_fits
from engine.core.request import RequestStatus
from engine.core.scheduler import max_len_within_cache
from tests.engine.core.helpers import (
    ToyPagedModel,
    check_invariants,
    make_request,
    make_scheduler,
    run_to_completion,
)

BS, W = 4, 8


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def ref_counts(kv: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in kv.pool.blocks]


def step(kv: KVCacheManager, req, n: int) -> list[int]:
    """Allocate the next ``n`` tokens as the scheduler does; the request's table after it."""
    assert kv.allocate_slots(req, n) is not None
    req.num_computed_tokens += n
    return kv.get_block_ids(req.request_id)


def test_decode_drops_blocks_behind_the_window() -> None:
    kv = KVCacheManager(BS, num_blocks=10, sliding_window=W)
    a = make_request("a", list(range(1, 11)))
    assert step(kv, a, 10) == [1, 2, 3]
    tables = []
    for _ in range(7):  # decode: the next query is at 10, 11, ... 16
        a.append_output_token_ids(99)
        tables.append(step(kv, a, 1))
    assert tables == [
        [1, 2, 3],  # query 10 sees 3..10: block 1 (0..3) still needed
        [0, 2, 3],  # query 11 sees 4..11: block 1 dropped
        [0, 2, 3, 4],
        [0, 2, 3, 4],
        [0, 2, 3, 4],  # query 14 sees 7..14: block 2 (4..7) still needed
        [0, 0, 3, 4],  # query 15 sees 8..15
        [0, 0, 3, 4, 5],
    ]
    assert kv.pool.free_block_ids() == [6, 7, 8, 9, 1, 2]
    assert kv.num_used_blocks == 3


def test_chunked_prefill_keeps_the_keys_before_each_chunk() -> None:
    """A chunk's first query needs the W-1 keys before it: only blocks wholly
    below ``start - W + 1`` go, never the ones the chunk's end would allow."""
    kv = KVCacheManager(BS, num_blocks=10, sliding_window=W)
    a = make_request("a", list(range(1, 31)))
    tables = [step(kv, a, 6) for _ in range(5)]  # chunks start at 0, 6, 12, 18, 24
    assert tables == [
        [1, 2],
        [1, 2, 3],
        [0, 2, 3, 4, 5],  # query 12 sees 5..12: block 2 (4..7) stays
        [0, 0, 3, 4, 5, 6],  # query 18 sees 11..18: block 3 (8..11) stays
        [0, 0, 0, 0, 5, 6, 7, 8],  # query 24 sees 17..24
    ]
    # Dropped one at a time, then 4 and 3 together tail first; 7 and 8 were taken since.
    assert kv.pool.free_block_ids() == [9, 1, 2, 4, 3]
    assert ref_counts(kv) == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]


def test_finish_and_abort_never_free_twice() -> None:
    kv = KVCacheManager(BS, num_blocks=10, sliding_window=W)
    a = make_request("a", list(range(1, 31)))
    for _ in range(5):
        step(kv, a, 6)
    kv.free(a)  # only 8, 7, 6, 5 are still held; the null entries are skipped
    assert kv.pool.free_block_ids() == [9, 1, 2, 4, 3, 8, 7, 6, 5]
    assert ref_counts(kv) == [0] * 10 and kv.num_free_blocks == 9
    kv.free(a)  # a second free (abort after finish) finds nothing
    assert kv.num_free_blocks == 9


def sample_all(out) -> dict[str, list[int]]:
    return {q.request_id: [1] for q in out.seqs if q.samples}


def test_block_dropped_by_the_window_survives_preemption_and_abort() -> None:
    """Block 1, dropped by a's window, goes to b, back to the pool when b is
    preempted, then to a again: every hand-over is one reference, and a's null
    entry is never freed."""
    # 5 usable blocks
    s = make_scheduler(block_size=BS, num_blocks=6, max_model_len=100, max_num_batched_tokens=10, sliding_window=W)
    a = make_request("a", list(range(1, 11)), max_tokens=20, ignore_eos=True)
    b = make_request("b", list(range(101, 109)), max_tokens=20, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    tables = []
    for _ in range(4):
        out = s.schedule()
        tables.append([(q.request_id, q.start_pos, q.block_ids) for q in out.seqs])
        s.update(out, sample_all(out))
        check_invariants(s)
    assert tables == [
        [("a", 0, [1, 2, 3])],
        [("a", 10, [1, 2, 3]), ("b", 0, [4, 5])],
        [("a", 11, [0, 2, 3]), ("b", 8, [4, 5, 1])],  # query 11 sees 4..11: block 1 dropped, b takes it
        [("a", 12, [0, 2, 3, 1])],  # a needs a block, none is free: b is preempted and 1 comes back
    ]
    assert out.preempted_ids == ["b"] and b.status == RequestStatus.PREEMPTED
    assert s.kv.pool.free_block_ids() == [5, 4]
    s.abort_requests(["a", "b"])
    assert s.kv.pool.free_block_ids() == [5, 4, 1, 3, 2]
    assert ref_counts(s.kv) == [0] * 6
    check_invariants(s)


class ChunkRecorder(ToyPagedModel):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunks: list[int] = []

    def run(self, out):
        self.chunks.extend(q.num_tokens for q in out.seqs)
        return super().run(out)


def test_prompt_longer_than_the_cache_is_served() -> None:
    """5 usable blocks hold 20 tokens; a 50-token prompt runs in chunks that
    fit beside its window, and its greedy toy outputs equal those of a roomy
    pool, with and without the window."""
    assert window_fits(6, BS, W) and window_fits(4, BS, W)  # 3 usable blocks: 7 keys and a token, any alignment
    assert not window_fits(3, BS, W) and not window_fits(100, BS, None)
    assert max_len_within_cache(200, 6, BS, W) == 200
    assert max_len_within_cache(200, 6, BS, None) == 20
    assert max_len_within_cache(200, 3, BS, W) == 8  # not even the window fits: the cache caps as before
    prompt = [(7 * i) % 5 for i in range(50)]
    with pytest.raises(ValueError, match="^prompt: 50 tokens exceeds max_model_len 20, capped by a KV cache"):
        make_scheduler(block_size=BS, num_blocks=6, max_model_len=200).add_request(make_request("x", prompt))
    outputs, chunks = [], []
    for num_blocks, window in ((6, W), (100, W), (100, None)):
        s = make_scheduler(block_size=BS, num_blocks=num_blocks, max_model_len=200, sliding_window=window)
        s.add_request(make_request("x", prompt, max_tokens=12, ignore_eos=True))
        model = ChunkRecorder(num_blocks, BS, window=window)
        outputs.append(run_to_completion(s, model))
        chunks.append(model.chunks)
        assert s.kv.num_free_blocks == num_blocks - 1
    assert chunks[0] == [20, 12, 12, 6] + [1] * 11 and chunks[1] == chunks[2] == [50] + [1] * 11
    assert len(outputs[0]["x"]) == 12 and outputs[0] == outputs[1] == outputs[2]


def test_small_cache_chunks_and_tables() -> None:
    """The 50-token prompt in 5 usable blocks: each chunk's table, exactly."""
    s = make_scheduler(block_size=BS, num_blocks=6, max_model_len=200, sliding_window=W)
    s.add_request(make_request("x", list(range(50)), max_tokens=1))
    seen = []
    for _ in range(4):
        out = s.schedule()
        seen.extend((q.start_pos, q.num_tokens, q.block_ids) for q in out.seqs)
        check_invariants(s)
        s.update(out, sample_all(out))
    # Each chunk takes what the pool holds beside the window its first query sees.
    assert seen == [
        (0, 20, [1, 2, 3, 4, 5]),
        (20, 12, [0, 0, 0, 4, 5, 3, 2, 1]),  # query 20 sees 13..20: 0..11 dropped, tail first, reused
        (32, 12, [0, 0, 0, 0, 0, 0, 2, 1, 3, 5, 4]),  # query 32 sees 25..32
        (44, 6, [0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 4, 3, 1]),  # query 44 sees 37..44: 5 and 4 stay
    ]
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 5


def _a_with_block_1_dropped(kv: KVCacheManager):
    """a's 20 tokens: 0..11 in blocks 1-3, then 12..19, whose first query (12)
    no longer sees block 1: it is dropped but keeps its hash."""
    a = make_request("a", list(range(1, 21)))
    step(kv, a, 12)
    assert step(kv, a, 8) == [0, 2, 3, 4, 5]
    assert kv.pool.blocks[1].ref_cnt == 0 and kv.pool.blocks[1].block_hash is not None
    return a


def test_prefix_hits_before_the_window_are_not_taken() -> None:
    """A dropped block's KV stays valid until the pool hands it out again, so it
    still anchors a prefix hit; but the hitting request takes only the hits its
    own window sees, the null block stands in for the rest."""
    kv = KVCacheManager(BS, num_blocks=10, sliding_window=W)
    _a_with_block_1_dropped(kv)
    assert kv.pool.free_block_ids() == [6, 7, 8, 9, 1]
    b = make_request("b", list(range(1, 17)) + [100, 101])
    hits, n = kv.get_computed_blocks(b)
    assert ids(hits) == [1, 2, 3, 4] and n == 16
    # query 16 sees 9..16: hits 1, 2 (0..7) are not taken, 3 and 4 are shared
    assert ids(kv.allocate_slots(b, 2, hits)) == [6]
    assert kv.get_block_ids("b") == [0, 0, 3, 4, 6]
    assert ref_counts(kv) == [0, 0, 1, 2, 2, 1, 1, 0, 0, 0]
    assert kv.pool.free_block_ids() == [7, 8, 9, 1]  # block 1 was not revived


def test_dropped_block_handed_out_again_is_no_longer_a_hit() -> None:
    kv = KVCacheManager(BS, num_blocks=10, sliding_window=W)
    _a_with_block_1_dropped(kv)
    c = make_request("c", list(range(200, 216)))
    assert ids(kv.allocate_slots(c, 16)) == [6, 7, 8, 9]
    assert ids(kv.allocate_slots(make_request("d", [300]), 1)) == [1]  # block 1 is overwritten: hash gone
    e = make_request("e", list(range(1, 17)) + [100])
    assert kv.get_computed_blocks(e) == ([], 0)  # a's chain starts at block 1, so nothing hits
    assert kv.pool.get_cached_block(kv.pool.blocks[2].block_hash) is kv.pool.blocks[2]


def test_null_block_is_never_registered() -> None:
    """b skips hits 1, 2, 3 and its new block evicts hit 1 from the cache;
    registering b's full blocks must not give the null block standing in for
    1 the hash 1 just lost, or a later prompt would hit block 0."""
    kv = KVCacheManager(BS, num_blocks=6, sliding_window=W)
    a = _a_with_block_1_dropped(kv)
    kv.free(a)
    assert kv.pool.free_block_ids() == [1, 5, 4, 3, 2]
    b = make_request("b", list(range(1, 21)) + [7])
    hits, n = kv.get_computed_blocks(b)
    assert ids(hits) == [1, 2, 3, 4, 5] and n == 20
    assert ids(kv.allocate_slots(b, 1, hits)) == [1]  # query 20 sees 13..20: only hits 4 and 5 are taken
    assert kv.get_block_ids("b") == [0, 0, 0, 4, 5, 1]
    assert kv.pool.null_block.block_hash is None
    assert kv.get_computed_blocks(make_request("e", [1, 2, 3, 4, 9, 9])) == ([], 0)
