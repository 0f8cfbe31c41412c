"""Expert parallelism: each rank keeps 1/ep_size of the routed experts, and the partial MoE
outputs, summed through the ``combine`` hook, reproduce the single-rank model."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.checkpoint.files import ModelLoadError
from engine.checkpoint.tiny import make_tiny
from engine.config import ParallelConfig
from tests.engine.native.models.helpers import engine_model, max_abs_diff, prompts_of, run_engine


def ep(ep_size: int, ep_rank: int) -> ParallelConfig:
    # The config requires a rendezvous address for ep_size > 1; these tests only load slices and
    # combine them in-process, so it is never dialled.
    return ParallelConfig(ep_size=ep_size, ep_rank=ep_rank, init_method="tcp://127.0.0.1:1")


class ThreadAllReduce:
    """An in-process stand-in for torch.distributed.all_reduce(SUM) between threads."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world

    def hook(self, rank: int):
        def combine(partial: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = partial
            self.barrier.wait()
            total = self.slots[0].clone()
            for t in self.slots[1:]:
                total += t  # same order on every rank -> identical results everywhere
            self.barrier.wait()  # all have read before anyone writes the next layer's partial
            return total

        return combine


@pytest.fixture(scope="module", params=["mixtral", "mistral4"])
def checkpoint(request, tmp_path_factory):
    arch = request.param
    return arch, make_tiny(arch, 1, str(tmp_path_factory.mktemp(f"ep_{arch}")))


def run_ranks(path: str, ep_size: int, prompts, decode: int):
    models = [engine_model(path, parallel=ep(ep_size, r)) for r in range(ep_size)]
    reduce = ThreadAllReduce(ep_size)
    for rank, model in enumerate(models):
        model.set_moe_combine(reduce.hook(rank))
    results: list = [None] * ep_size
    errors: list = []

    def work(rank: int) -> None:
        try:
            results[rank] = run_engine(models[rank], prompts, decode)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            reduce.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(ep_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return models, results


def test_two_ranks_sum_to_the_single_rank_model(checkpoint):
    arch, path = checkpoint
    prompts = prompts_of([5, 14, 23])
    full = engine_model(path)
    full_tokens, full_logits = run_engine(full, prompts, 6)
    _models, results = run_ranks(path, 2, prompts, 6)
    for tokens, logits in results:
        assert tokens == full_tokens
        for got, expected in zip(logits, full_logits):
            assert max_abs_diff(got, expected) < 2e-5, arch
    # both ranks computed exactly the same thing after the all-reduce
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_each_rank_holds_its_half_of_the_experts(checkpoint):
    arch, path = checkpoint
    full = engine_model(path)
    ranks = [engine_model(path, parallel=ep(2, r)) for r in range(2)]
    total = full.num_local_expert_params()
    assert total > 0
    for rank in ranks:
        print(f"{arch}: rank holds {rank.num_local_expert_params()} of {total} routed expert params")
        assert rank.num_local_expert_params() * 2 == total
    for full_moe, *rank_moes in zip(full.moe_layers(), *(r.moe_layers() for r in ranks)):
        per_rank = full_moe.experts.num_experts // 2
        for r, moe in enumerate(rank_moes):
            assert moe.experts.expert_start == r * per_rank
            sl = slice(r * per_rank, (r + 1) * per_rank)
            assert torch.equal(moe.experts.gate_up_proj, full_moe.experts.gate_up_proj[sl])
            assert torch.equal(moe.experts.down_proj, full_moe.experts.down_proj[sl])
            assert torch.equal(moe.gate.weight, full_moe.gate.weight)  # router is replicated
            if full_moe.shared_experts is not None:  # so is the shared expert
                assert torch.equal(moe.shared_experts.up_proj.weight, full_moe.shared_experts.up_proj.weight)


def test_partial_outputs_and_shared_expert_order(checkpoint):
    """Per MoE layer: rank partials sum to the full routed output; the shared expert is added
    after combine on every rank (so with an identity combine each rank adds it once)."""
    _, path = checkpoint
    full = engine_model(path)
    ranks = [engine_model(path, parallel=ep(2, r)) for r in range(2)]
    x = torch.randn(7, full.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for full_moe, moe0, moe1 in zip(full.moe_layers(), ranks[0].moe_layers(), ranks[1].moe_layers()):
            shared = full_moe.shared_experts(x) if full_moe.shared_experts is not None else 0
            expected_routed = full_moe(x) - shared
            got = moe0(x) + moe1(x) - 2 * shared  # identity combine: each rank = its partial + shared
            assert max_abs_diff(got, expected_routed) < 1e-4


def test_expert_count_must_divide(checkpoint):
    _, path = checkpoint
    with pytest.raises(ModelLoadError, match="cannot be split evenly over ep_size=3"):
        engine_model(path, parallel=ep(3, 0))


def test_other_ranks_per_expert_tensors_are_not_read(tmp_path):
    path = make_tiny("mixtral", 0, str(tmp_path), num_hidden_layers=1)
    rank1 = engine_model(path, parallel=ep(2, 1))
    assert not rank1.is_weight_needed("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    assert rank1.is_weight_needed("model.layers.0.block_sparse_moe.experts.5.w2.weight")
    assert rank1.is_weight_needed("model.layers.0.mlp.experts.gate_up_proj")  # fused: sliced after reading
    assert rank1.is_weight_needed("model.layers.0.self_attn.q_proj.weight")
