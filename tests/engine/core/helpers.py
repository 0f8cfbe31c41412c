"""Shared test helpers: scheduler factory, a toy paged model, invariant checks."""

from __future__ import annotations

from collections import Counter

from engine.config import CacheConfig, SchedulerConfig
from engine.core.kv_cache import cdiv
from engine.core.request import Request, RequestStatus, SamplingParams
from engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput

EOS = 0


def make_scheduler(
    block_size: int = 4,
    num_blocks: int = 16,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 32,
    long_prefill_token_threshold: int = 0,
    enable_prefix_caching: bool = True,
    sliding_window: int | None = None,
) -> Scheduler:
    sc = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        long_prefill_token_threshold=long_prefill_token_threshold,
    )
    cc = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(sc, cc, num_blocks, sliding_window=sliding_window)


def make_request(rid: str, prompt: list[int], eos: int | None = EOS, **sp: object) -> Request:
    return Request(rid, prompt, SamplingParams(**sp), eos_token_id=eos)  # type: ignore[arg-type]


def _mix(prev: int, token: int) -> int:
    return (prev * 1_000_003 + token + 1) % (1 << 61)


SEED_KV = 12345


def reference_kv(token_ids: list[int]) -> int:
    """What the toy model's KV at the last position must be for this context."""
    kv = SEED_KV
    for t in token_ids:
        kv = _mix(kv, t)
    return kv


class ToyPagedModel:
    """A model whose "KV" at position p is mix(KV[p-1], token p), stored in a
    paged cache and read back through the block table, like attention does.

    A wrong block table, a bad prefix hit or an evicted-but-still-used block
    makes the KV differ from ``reference_kv`` of the request's tokens. Seqs are
    run in batch order, so a request hitting blocks an earlier seq of the same
    step fills sees them written (a real runner writes a layer's KV for the
    whole batch before attention reads it).

    With ``window`` (>= 2) block tables may hold the null block, but every key
    the chunk's first query sees (the ``window - 1`` positions before it) must
    sit in a real block and link up: a slot keeps (KV[p], KV[p-1]), so a block
    dropped or handed to another request too early breaks the chain.
    """

    def __init__(self, num_blocks: int, block_size: int, vocab: int = 5, window: int | None = None) -> None:
        self.bs = block_size
        self.vocab = vocab
        self.window = window
        self.cache: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)

    def _slot(self, block_ids: list[int], pos: int) -> int:
        assert block_ids[pos // self.bs] != 0, f"position {pos} maps to the null block"
        return block_ids[pos // self.bs] * self.bs + pos % self.bs

    def _read(self, seq: ScheduledSeq, pos: int) -> tuple[int, int]:
        entry = self.cache[self._slot(seq.block_ids, pos)]
        assert entry is not None, f"{seq.request_id}: reads a slot never written"
        return entry

    def _check_window(self, seq: ScheduledSeq) -> None:
        """Walk back over the keys the window still needs: each slot's KV is its successor's predecessor."""
        expect = None
        for pos in range(seq.start_pos - 1, max(0, seq.start_pos - self.window + 1) - 1, -1):
            kv, prev = self._read(seq, pos)
            assert expect is None or kv == expect, f"{seq.request_id}: position {pos} holds another KV"
            expect = prev

    def run(self, out: SchedulerOutput) -> dict[str, int]:
        """KV at the last position of every sampling seq."""
        last: dict[str, int] = {}
        for seq in out.seqs:
            assert len(seq.block_ids) == cdiv(seq.start_pos + seq.num_tokens, self.bs)
            if self.window is None:
                assert 0 not in seq.block_ids
            else:
                self._check_window(seq)
            kv = SEED_KV if seq.start_pos == 0 else self._read(seq, seq.start_pos - 1)[0]
            for i, t in enumerate(seq.token_ids):
                kv, prev = _mix(kv, t), kv
                self.cache[self._slot(seq.block_ids, seq.start_pos + i)] = (kv, prev)
            if seq.samples:
                last[seq.request_id] = kv
        return last

    def next_token(self, kv: int) -> int:
        return (kv >> 17) % self.vocab


def run_to_completion(sched: Scheduler, model: ToyPagedModel, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Drive greedy toy decoding until every request finished; outputs by id."""
    outputs: dict[str, list[int]] = {rid: [] for rid in sched.requests}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outputs
        out = sched.schedule()
        kvs = model.run(out)
        for rid, kv in kvs.items():
            assert kv == reference_kv(sched.requests[rid].all_token_ids)
        for o in sched.update(out, {rid: [model.next_token(kv)] for rid, kv in kvs.items()}):
            outputs[o.request_id].extend(o.new_token_ids)
        check_invariants(sched)
    raise AssertionError("scheduler did not drain")


def check_invariants(sched: Scheduler) -> None:
    kv, pool = sched.kv, sched.kv.pool
    holders: Counter[int] = Counter()
    for rid, blocks in kv.req_to_blocks.items():
        req = sched.requests[rid]
        assert req.status == RequestStatus.RUNNING, (rid, req.status)  # waiting/preempted hold nothing
        all_ids = [b.block_id for b in blocks]
        # The null block only where the window dropped blocks: a prefix of the table, behind the window.
        num_null = next((i for i, b in enumerate(all_ids) if b != 0), len(all_ids))
        assert num_null <= kv.num_skipped_blocks(req.num_computed_tokens), (rid, all_ids, req.num_computed_tokens)
        ids = all_ids[num_null:]
        assert len(set(ids)) == len(ids) and 0 not in ids, all_ids
        assert len(blocks) == cdiv(req.num_computed_tokens, kv.block_size), (rid, all_ids, req.num_computed_tokens)
        holders.update(ids)
    for b in pool.blocks[1:]:
        assert b.ref_cnt == holders[b.block_id], (b, holders[b.block_id])
        if holders[b.block_id] > 1:
            assert b.block_hash is not None, f"block {b.block_id} shared but not a cached prefix block"
    assert pool.null_block.ref_cnt == 0 and pool.null_block.block_hash is None and 0 not in pool.free_block_ids()
    assert sorted(pool.free_block_ids()) == [b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0]
    assert kv.num_free_blocks + kv.num_used_blocks == pool.num_blocks - 1
    for h, b in pool._cached.items():
        assert b.block_hash == h
    assert all(r.status == RequestStatus.RUNNING for r in sched.running)
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in sched.waiting)
    assert {r.request_id for r in [*sched.running, *sched.waiting]} == set(sched.requests)
    assert len(sched.running) + len(sched.waiting) == len(sched.requests)
    assert len(sched.running) <= sched.config.max_num_seqs
