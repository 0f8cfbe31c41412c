import pytest

from engine.core.request import RequestStatus
from engine.core.scheduler import EngineCoreOutput, ScheduledSeq
from tests.engine.core.helpers import (
    ToyPagedModel,
    check_invariants,
    make_request,
    make_scheduler,
    reference_kv,
    run_to_completion,
)


def by_id(out) -> dict[str, ScheduledSeq]:
    return {s.request_id: s for s in out.seqs}


def test_lifecycle_exact_seqs_and_outputs() -> None:
    s = make_scheduler(block_size=4, num_blocks=16)
    s.add_request(make_request("r", [5, 6, 7, 8, 9], max_tokens=3))
    out = s.schedule()
    assert out.seqs == [ScheduledSeq("r", [5, 6, 7, 8, 9], 0, [1, 2], samples=True, wants_prompt_logprobs=False)]
    assert (out.num_batched_tokens, out.preempted_ids) == (5, [])
    assert s.update(out, {"r": [3]}) == [EngineCoreOutput("r", [3], None, None, 0)]
    out = s.schedule()
    assert out.seqs == [ScheduledSeq("r", [3], 5, [1, 2], True, False)] and out.num_batched_tokens == 1
    s.update(out, {"r": [4]})
    out = s.schedule()
    assert (out.seqs[0].token_ids, out.seqs[0].start_pos) == ([4], 6)
    assert s.update(out, {"r": [1]}) == [EngineCoreOutput("r", [1], "length", None, 0)]
    assert s.kv.num_free_blocks == 15 and not s.has_unfinished_requests()
    out = s.schedule()
    assert out.seqs == []


def test_chunked_prefill_while_decode_runs_every_step() -> None:
    s = make_scheduler(block_size=4, num_blocks=32, max_num_batched_tokens=6, max_model_len=64)
    s.add_request(make_request("a", [1, 2, 3], max_tokens=20))
    s.update(s.schedule(), {"a": [7]})
    s.add_request(make_request("b", list(range(100, 120)), max_tokens=1))  # 20-token prompt
    a_blocks = [[1], [1, 4], [1, 4], [1, 4]]
    b_blocks = [[2, 3], [2, 3, 5], [2, 3, 5, 6], [2, 3, 5, 6, 7]]
    for step in range(4):
        out = s.schedule()
        a, b = out.seqs  # running (decode) first, then the prompt chunk
        assert (a.request_id, a.token_ids, a.start_pos, a.samples) == ("a", [7], 3 + step, True)
        assert a.block_ids == a_blocks[step]
        assert (b.request_id, b.start_pos, b.block_ids) == ("b", 5 * step, b_blocks[step])
        assert b.token_ids == list(range(100 + 5 * step, 105 + 5 * step))
        assert b.samples == (step == 3) and out.num_batched_tokens == 6
        outs = s.update(out, {"a": [7], "b": [9]} if b.samples else {"a": [7]})
        assert [o.request_id for o in outs] == (["a", "b"] if step == 3 else ["a"])
    assert outs[1].finish_reason == "length"
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["a"]


def test_long_prefill_threshold_lets_prompts_share_a_step() -> None:
    s = make_scheduler(max_num_batched_tokens=8, long_prefill_token_threshold=3)
    s.add_request(make_request("a", [1] * 5))
    s.add_request(make_request("b", [2] * 5))
    out = s.schedule()
    chunks = [(q.request_id, q.start_pos, q.num_tokens, q.samples) for q in out.seqs]
    assert chunks == [("a", 0, 3, False), ("b", 0, 3, False)]
    out = s.schedule()  # no update needed in between: nothing sampled
    chunks = [(q.request_id, q.start_pos, q.num_tokens, q.samples) for q in out.seqs]
    assert chunks == [("a", 3, 2, True), ("b", 3, 2, True)]


def test_preemption_by_recompute_exact_blocks() -> None:
    # 4 usable blocks of 2 tokens; two requests of 3-token prompts each grow past 2 blocks.
    s = make_scheduler(block_size=2, num_blocks=5, max_model_len=8)
    s.add_request(make_request("a", [1, 2, 3], max_tokens=5, ignore_eos=True))
    s.add_request(make_request("b", [4, 5, 6], max_tokens=5, ignore_eos=True))
    out = s.schedule()
    assert [q.block_ids for q in out.seqs] == [[1, 2], [3, 4]]
    s.update(out, {"a": [9], "b": [9]})
    s.update(s.schedule(), {"a": [9], "b": [9]})  # 4 slots: still 2 blocks each
    out = s.schedule()  # a needs a 3rd block: b (last running) is preempted
    assert out.preempted_ids == ["b"] and list(by_id(out)) == ["a"] and by_id(out)["a"].block_ids == [1, 2, 4]
    b = s.requests["b"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions, list(s.waiting)) == (RequestStatus.PREEMPTED, 0, 1, [b])
    assert s.kv.get_block_ids("b") == [] and s.kv.pool.free_block_ids() == [3]
    check_invariants(s)
    s.update(out, {"a": [9]})
    out = s.schedule()  # b would need 3 blocks (1 cached hit + 2), only 1 free: stays waiting
    assert list(by_id(out)) == ["a"] and s.requests["b"].status == RequestStatus.PREEMPTED
    s.update(out, {"a": [9]})
    out = s.schedule()
    assert by_id(out)["a"].block_ids == [1, 2, 4, 3]
    assert s.update(out, {"a": [9]})[0].finish_reason == "length"
    out = s.schedule()  # a freed tail first: [3, 4, 2, 1]; b recomputes prompt + its 2 outputs
    assert out.seqs == [ScheduledSeq("b", [4, 5, 6, 9, 9], 0, [3, 4, 2], True, False)]
    assert s.get_stats().num_preemptions_total == 1
    for _ in range(3):
        outs = s.update(out, {"b": [9]})
        out = s.schedule()
    assert outs[0].finish_reason == "length" and b.output_token_ids == [9] * 5
    assert s.kv.num_free_blocks == 4


def test_preempted_requests_finish_with_the_same_tokens() -> None:
    prompts = {f"r{i}": [(i * 7 + j) % 5 for j in range(3 + i)] for i in range(4)}

    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        s = make_scheduler(block_size=2, num_blocks=num_blocks, max_model_len=16, max_num_batched_tokens=8)
        for rid, p in prompts.items():
            s.add_request(make_request(rid, p, eos=None, max_tokens=9))
        outs = run_to_completion(s, ToyPagedModel(num_blocks, 2))
        assert s.kv.num_free_blocks == num_blocks - 1
        return outs, s.get_stats().num_preemptions_total

    roomy, n_roomy = run(64)
    tight, n_tight = run(9)
    assert n_roomy == 0 and n_tight > 0
    assert tight == roomy and all(len(v) == 9 for v in tight.values())


def test_abort_frees_blocks_at_once() -> None:
    s = make_scheduler(block_size=4, num_blocks=16, max_num_seqs=1)
    s.add_request(make_request("a", list(range(1, 10))))
    s.add_request(make_request("w", [1, 2]))
    out = s.schedule()
    assert s.kv.num_free_blocks == 12
    s.abort_requests(["a", "w", "unknown"])
    assert s.kv.num_free_blocks == 15 and not s.has_unfinished_requests()
    assert s.update(out, {"a": [3]}) == []  # aborted between schedule and update: skipped
    out = s.schedule()
    assert out.seqs == []


@pytest.mark.parametrize(
    "sp, tokens, new, reason, stop_reason",
    [
        ({}, [3, 0, 4], [3, 0], "stop", None),  # eos
        ({"ignore_eos": True, "max_tokens": 3}, [0, 0, 0, 0], [0, 0, 0], "length", None),
        ({"stop_token_ids": [5]}, [3, 5, 6], [3, 5], "stop", 5),
        ({"max_tokens": 2}, [3, 4, 6], [3, 4], "length", None),
        ({"max_tokens": 100}, [3, 4, 6], [3, 4, 6], None, None),
    ],
)
def test_stop_conditions(sp: dict, tokens: list[int], new: list[int], reason: str | None, stop_reason) -> None:
    s = make_scheduler()
    s.add_request(make_request("r", [1, 2], **sp))
    (o,) = s.update(s.schedule(), {"r": tokens})
    assert (o.new_token_ids, o.finish_reason, o.stop_reason) == (new, reason, stop_reason)
    assert s.has_unfinished_requests() == (reason is None)


def test_stop_at_max_model_len() -> None:
    s = make_scheduler(block_size=4, num_blocks=8, max_model_len=8)
    s.add_request(make_request("r", list(range(1, 7)), max_tokens=100))
    s.update(s.schedule(), {"r": [9]})
    (o,) = s.update(s.schedule(), {"r": [9]})
    assert o.finish_reason == "length" and s.kv.num_free_blocks == 7


def test_finish_requests_with_stop_string() -> None:
    s = make_scheduler()
    r = make_request("r", [1, 2])
    s.add_request(r)
    s.update(s.schedule(), {"r": [3]})
    s.finish_requests("r", RequestStatus.FINISHED_STOPPED, stop_reason="END")
    assert (r.finish_reason, r.stop_reason, s.kv.num_free_blocks) == ("stop", "END", 15)


def test_add_request_validation() -> None:
    s = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError, match="^prompt: 32 tokens exceeds max_model_len 32"):
        s.add_request(make_request("long", [1] * 32))
    s.add_request(make_request("ok", [1] * 31))
    with pytest.raises(ValueError, match="^request_id: 'ok' is already"):
        s.add_request(make_request("ok", [1]))


def test_small_cache_caps_max_model_len() -> None:
    # 3 usable blocks of 4: no sequence can outgrow 12 tokens, or a lone
    # request would be preempted and re-admitted forever.
    s = make_scheduler(block_size=4, num_blocks=4, max_model_len=100)
    assert s.max_model_len == 12
    with pytest.raises(ValueError, match="^prompt: 12 tokens exceeds max_model_len 12, capped by a KV cache"):
        s.add_request(make_request("long", [1] * 12))
    s.add_request(make_request("r", [1] * 9, max_tokens=100, eos=None))
    outs = run_to_completion(s, ToyPagedModel(4, 4))
    assert len(outs["r"]) == 3 and s.get_stats().num_preemptions_total == 0


def test_max_num_seqs_caps_admission() -> None:
    s = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add_request(make_request(rid, [1, 2], max_tokens=1))
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["a", "b"]
    s.update(out, {"a": [3], "b": [3]})
    assert [q.request_id for q in s.schedule().seqs] == ["c"]


def test_prefix_hit_in_same_and_later_step() -> None:
    s = make_scheduler(block_size=4, num_blocks=16)
    model = ToyPagedModel(16, 4)
    s.add_request(make_request("a", list(range(1, 10)), max_tokens=1))
    s.add_request(make_request("b", list(range(1, 9)) + [50, 51], max_tokens=1))
    out = s.schedule()  # b hits the blocks a fills in this very step
    assert [(q.request_id, q.start_pos, q.token_ids, q.block_ids) for q in out.seqs] == [
        ("a", 0, list(range(1, 10)), [1, 2, 3]),
        ("b", 8, [50, 51], [1, 2, 4]),
    ]
    model.run(out)
    outs = s.update(out, {"a": [3], "b": [3]})
    assert [o.num_cached_tokens for o in outs] == [0, 8]
    stats = s.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_free_blocks) == (19, 8, 15)
    s.add_request(make_request("c", list(range(1, 9)) + [60], max_tokens=1))
    out = s.schedule()  # free queue is [5..15, 4, 3, 2, 1]: c revives 1, 2 and takes 5
    assert [(q.request_id, q.start_pos, q.token_ids, q.block_ids) for q in out.seqs] == [("c", 8, [60], [1, 2, 5])]
    kvs = model.run(out)
    assert kvs["c"] == reference_kv(list(range(1, 9)) + [60])


def test_prompt_logprobs_flag_and_no_hits() -> None:
    s = make_scheduler(block_size=4, max_num_batched_tokens=4)
    s.add_request(make_request("a", list(range(1, 10)), max_tokens=1))
    while s.has_unfinished_requests():  # a's full blocks end up cached
        out = s.schedule()
        s.update(out, {q.request_id: [3] for q in out.seqs if q.samples})
    s.add_request(make_request("p", list(range(1, 7)), prompt_logprobs=2))
    (p,) = (out := s.schedule()).seqs
    assert (p.start_pos, p.num_tokens, p.wants_prompt_logprobs, p.samples) == (0, 4, True, False)  # no hit
    s.update(out, {})
    (p,) = (out := s.schedule()).seqs
    assert (p.start_pos, p.num_tokens, p.wants_prompt_logprobs, p.samples) == (4, 2, True, True)
    s.update(out, {"p": [3]})
    (p,) = s.schedule().seqs
    assert (p.start_pos, p.wants_prompt_logprobs) == (6, False)


def test_prompt_logprobs_flagged_once_across_preemption() -> None:
    # p (prompt_logprobs) is preempted twice by a, once mid-prefill; its
    # recompute must not flag prompt positions that already went out.
    s = make_scheduler(block_size=2, num_blocks=7, max_num_batched_tokens=3, max_model_len=12)
    s.add_request(make_request("a", [1, 2], max_tokens=9, eos=None))
    s.add_request(make_request("p", list(range(3, 10)), max_tokens=4, eos=None, prompt_logprobs=1))
    flagged: list[tuple[int, int]] = []
    while s.has_unfinished_requests():
        out = s.schedule()
        flagged += [(q.start_pos, q.start_pos + q.num_tokens) for q in out.seqs if q.wants_prompt_logprobs]
        s.update(out, {q.request_id: [5] for q in out.seqs if q.samples})
        check_invariants(s)
    assert s.get_stats().num_preemptions_total >= 1
    # The flagged chunks tile the 7 prompt positions exactly once, in order.
    assert [p for se in flagged for p in range(*se)] == list(range(7))
