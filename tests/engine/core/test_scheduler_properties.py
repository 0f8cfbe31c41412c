"""Random add / abort / step streams on tiny pools: the block accounting and
the paged toy model must stay consistent after every step, and everything
drains."""

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from engine.core.kv_cache import cdiv
from engine.core.scheduler import Scheduler
from tests.engine.core.helpers import (
    EOS,
    ToyPagedModel,
    check_invariants,
    make_request,
    make_scheduler,
    reference_kv,
    run_to_completion,
)

VOCAB = 4  # tiny, so prompts share prefixes and hit the cache


@st.composite
def configs(draw: st.DrawFn) -> dict:
    bs = draw(st.integers(1, 4))
    max_model_len = draw(st.integers(4, 16))
    # Mostly just enough blocks for one max_model_len sequence (or a few
    # more); sometimes fewer, so the cache caps the length, unless a sliding
    # window drops blocks behind it (the toy model needs a window >= 2).
    return dict(
        block_size=bs,
        max_model_len=max_model_len,
        num_blocks=max(2, cdiv(max_model_len, bs) + 1 + draw(st.sampled_from([0, 0, 1, 3, -2, -4]))),
        max_num_seqs=draw(st.integers(1, 4)),
        max_num_batched_tokens=draw(st.integers(1, 12)),
        long_prefill_token_threshold=draw(st.integers(0, 3)),
        enable_prefix_caching=draw(st.booleans()),
        sliding_window=draw(st.sampled_from([None, None, 2, 3, 5, 8])),
    )


@st.composite
def prompts(draw: st.DrawFn, base: list[int], max_len: int) -> list[int]:
    """Often a prefix of the example's shared ``base`` plus a random tail."""
    head = base[: draw(st.integers(0, len(base)))]
    tail = draw(st.lists(st.integers(0, VOCAB - 1), max_size=4))
    return (head + tail)[:max_len] or [1]


def ops(base: list[int], max_model_len: int) -> st.SearchStrategy:
    add = st.tuples(
        st.just("add"),
        prompts(base, max_model_len - 1),
        st.integers(1, 8),
        st.sampled_from([None, EOS]),
        st.booleans(),
        st.sampled_from([(), (3,)]),
        st.sampled_from([None, None, None, 1]),
    )
    abort = st.tuples(st.just("abort"), st.integers(0, 50))
    step = st.tuples(st.just("step"))
    return st.lists(st.one_of(add, add, abort, step, step), min_size=4, max_size=40)


def step(s: Scheduler, model: ToyPagedModel, data: st.DataObject, flagged: dict[str, list[int]]) -> None:
    out = s.schedule()
    for q in out.seqs:
        if q.wants_prompt_logprobs:
            flagged.setdefault(q.request_id, []).extend(range(q.start_pos, q.start_pos + q.num_tokens))
    kvs = model.run(out)
    for rid, kv in kvs.items():  # the paged cache holds exactly this request's context
        assert kv == reference_kv(s.requests[rid].all_token_ids), rid
    if out.preempted_ids:
        event("preempted")
    if any(q.start_pos > 0 and q.num_tokens > 1 for q in out.seqs):
        event("prefix hit or prefill chunk")
    if len(out.seqs) > 1 and any(not q.samples for q in out.seqs):
        event("prefill chunk batched with others")
    if any(0 in q.block_ids for q in out.seqs):
        event("sliding window dropped a block")
    sampled = {rid: [data.draw(st.integers(0, VOCAB - 1), label=f"tok {rid}")] for rid in kvs}
    for o in s.update(out, sampled):
        assert o.new_token_ids == sampled[o.request_id]
    check_invariants(s)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), data=st.data())
def test_random_streams_keep_invariants_and_drain(cfg: dict, data: st.DataObject) -> None:
    s = make_scheduler(**cfg)
    model = ToyPagedModel(cfg["num_blocks"], cfg["block_size"], VOCAB, cfg["sliding_window"])
    added = []
    flagged: dict[str, list[int]] = {}  # prompt positions sent with wants_prompt_logprobs
    base = data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=12), label="shared prefix")
    for op in data.draw(ops(base, cfg["max_model_len"]), label="ops"):
        if op[0] == "add":
            _, prompt, max_tokens, eos, ignore_eos, stop_ids, prompt_logprobs = op
            req = make_request(
                f"r{len(added)}",
                prompt,
                eos=eos,
                max_tokens=max_tokens,
                ignore_eos=ignore_eos,
                stop_token_ids=stop_ids,
                prompt_logprobs=prompt_logprobs,
            )
            if len(prompt) >= s.max_model_len:  # only when the cache caps the length
                with pytest.raises(ValueError, match="^prompt: "):
                    s.add_request(req)
                continue
            s.add_request(req)
            added.append(req)
            if len(prompt) > (cfg["num_blocks"] - 1) * cfg["block_size"]:
                event("prompt longer than the cache")
        elif op[0] == "abort" and added:
            s.abort_requests([added[op[1] % len(added)].request_id])
        else:
            step(s, model, data, flagged)
        check_invariants(s)
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        step(s, model, data, flagged)
    assert not s.has_unfinished_requests(), "did not drain"
    assert all(r.is_finished for r in added)
    assert s.kv.num_free_blocks == cfg["num_blocks"] - 1 and s.kv.req_to_blocks == {}
    for r in added:
        if r.sampling_params.prompt_logprobs is not None and r.num_output_tokens:
            # Each prompt position exactly once, even across preemptions.
            assert flagged[r.request_id][: r.num_prompt_tokens] == list(range(r.num_prompt_tokens))
        assert r.num_output_tokens <= r.sampling_params.max_tokens and r.num_tokens <= s.max_model_len
    if s.get_stats().prefix_cache_hits:
        event("prefix cache hit")


@settings(max_examples=60, deadline=None)
@given(
    cfg=configs(),
    prompt_list=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), min_size=1, max_size=5),
    max_tokens=st.integers(1, 8),
)
def test_outputs_do_not_depend_on_pool_size(cfg: dict, prompt_list: list[list[int]], max_tokens: int) -> None:
    """Greedy toy decoding gives the same tokens in a tiny pool (preemption,
    recompute, evictions) as in a roomy one."""
    results = []
    # The roomy pool keeps the tiny pool's max_model_len (which it may cap).
    tiny = make_scheduler(**cfg)
    assume(tiny.max_model_len > 1)  # a one-token cache has no room for a prompt and its output
    for num_blocks in (cfg["num_blocks"], 200):
        c = dict(cfg, num_blocks=num_blocks, max_model_len=tiny.max_model_len)
        s = make_scheduler(**c)
        for i, p in enumerate(prompt_list):
            s.add_request(make_request(f"r{i}", p[: s.max_model_len - 1], eos=EOS, max_tokens=max_tokens))
        model = ToyPagedModel(num_blocks, cfg["block_size"], VOCAB, cfg["sliding_window"])
        results.append(run_to_completion(s, model))
        assert s.kv.num_free_blocks == num_blocks - 1
        if s.get_stats().num_preemptions_total:
            event("preempted")
    assert results[0] == results[1]
