"""What the engine reports for operators: each request's stage timings, and how many token-to-expert
assignments each expert-parallel rank's slice of the experts received."""

from __future__ import annotations

import time

import pytest
import torch

from engine.checkpoint.tiny import make_tiny, tiny_config
from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from engine.core.request import SamplingParams
from engine.native.builder import build_engine_core
from engine.native.engine_core import EngineCore
from engine.output import collect_output
from tests.engine.native.models.helpers import engine_model


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    return make_tiny("mixtral", seed=2, out=str(tmp_path_factory.mktemp("tiny-mixtral")))


def run_to_end(core: EngineCore) -> dict:
    finals = {}
    while core.has_unfinished_requests():
        for d in core.step():
            if d.finished:
                finals[d.request_id] = d
    return finals


def test_timings_follow_the_stages_in_order(mixtral):
    core = build_engine_core(EngineConfig(model=ModelConfig(model=mixtral), cache=CacheConfig(num_blocks=64)))
    before = time.time()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt_ids = core.add_request("a", list(range(3, 30)), params, arrival=before - 0.25)  # handed over a moment ago
    final = run_to_end(core)["a"]
    t = final.timings
    assert t is not None and t.num_preemptions == 0
    assert t.arrival == before - 0.25
    assert t.arrival < before <= t.first_scheduled <= t.first_token <= t.finished <= time.time()
    assert collect_output(prompt_ids, params, [final]).timings == t  # the LLM API's output carries the same figures


def test_a_request_aborted_while_waiting_never_reached_prefill(mixtral):
    core = build_engine_core(EngineConfig(model=ModelConfig(model=mixtral), cache=CacheConfig(num_blocks=64)))
    core.add_request("w", [5, 6, 7], SamplingParams(max_tokens=4))
    delta = core.abort_request("w")
    assert delta.timings.first_scheduled is None and delta.timings.first_token is None
    assert delta.timings.arrival <= delta.timings.finished


def test_expert_load_counts_every_routed_token(mixtral):
    cfg = tiny_config("mixtral")
    core = build_engine_core(
        EngineConfig(model=ModelConfig(model=mixtral), cache=CacheConfig(num_blocks=64, enable_prefix_caching=False))
    )
    assert core.stats().expert_load == (0,)
    prompt, new = 21, 7
    core.add_request("a", list(range(3, 3 + prompt)), SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    run_to_end(core)
    # every forwarded position (the prompt, then each sampled token but the last) meets k experts per MoE layer
    forwarded = prompt + new - 1
    assert core.stats().expert_load == (forwarded * cfg["num_experts_per_tok"] * cfg["num_hidden_layers"],)


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_expert_load_splits_by_the_ranks_expert_slices(mixtral, ep_rank):
    """Each rank counts every token's routing (routing is replicated), binned by whose slice the expert is in."""
    cfg = tiny_config("mixtral")
    model = engine_model(mixtral, parallel=ParallelConfig(ep_size=2, ep_rank=ep_rank, init_method="tcp://127.0.0.1:1"))
    moe = model.moe_layers()[0]
    x = torch.randn(40, cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, ids = moe.route(moe.gate(x))
        moe(x)
    per_rank = cfg["num_local_experts"] // 2
    expected = [int((ids < per_rank).sum()), int((ids >= per_rank).sum())]
    assert moe.rank_load.tolist() == expected
    assert min(expected) > 0, "the check needs tokens routed to both slices"
    assert model.expert_load() == tuple(expected)  # the other MoE layer has not run
