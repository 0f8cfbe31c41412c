"""The step message format and the checks that need no second process."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from engine.core.scheduler import ScheduledSeq
from engine.native.builder import build_engine_core
from engine.native.parallel.wire import HEADER_LEN, Hello, Kind, pack_step, payload_len, step_header, unpack_step
from engine.native.runner import StepInputs
from tests.engine.native.models.helpers import engine_model, prompts_of, run_engine


def test_step_inputs_round_trip_through_the_payload():
    seqs = [
        ScheduledSeq("a", [7, 8, 9], 0, [4, 9], True, False),  # prefill
        ScheduledSeq("b", [3], 17, [1, 2, 5, 6, 11], True, False),  # decode, longest table
        ScheduledSeq("c", [10, 11], 5, [12, 3], False, False),
    ]  # a prefill chunk
    inputs = StepInputs.of(seqs)
    assert inputs.positions == [0, 1, 2, 17, 5, 6]
    assert inputs.seq_lens == [3, 18, 7]
    head = step_header(inputs)
    assert len(head) == HEADER_LEN and head[:4] == [Kind.STEP, 6, 3, 5]
    payload = pack_step(inputs, head[3], torch.device("cpu"))
    assert payload.dtype == torch.int64 and payload.numel() == payload_len(head)
    assert unpack_step(head, payload) == inputs


def test_hello_round_trips_through_its_header():
    hello = Hello(num_blocks=129, block_size=16, max_model_len=4096, vocab_size=32768, num_expert_params=123456)
    head = hello.header()
    assert len(head) == HEADER_LEN and head[0] == Kind.HELLO
    assert Hello.of(head) == hello


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(ep_size=2), "init_method"),
        (dict(ep_size=2, init_method="127.0.0.1:29500"), "init_method"),
        (dict(backend="mpi"), "backend"),
        (dict(timeout_s=0), "timeout_s"),
        (dict(ep_size=2, ep_rank=2, init_method="tcp://127.0.0.1:1"), "ep_rank"),
    ],
)
def test_parallel_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        ParallelConfig(**kwargs)


def test_parallel_config_defaults_are_a_single_rank():
    p = ParallelConfig()
    assert (p.ep_size, p.ep_rank, p.backend, p.init_method) == (1, 0, "gloo", None)


def test_a_dense_model_is_not_split(tmp_path):
    path = make_tiny("mistral", 0, str(tmp_path))
    cfg = EngineConfig(
        model=ModelConfig(model=path),
        cache=CacheConfig(num_blocks=8),
        parallel=ParallelConfig(ep_size=2, init_method="tcp://127.0.0.1:1"),
    )
    with pytest.raises(ValueError, match="no routed experts"):
        build_engine_core(cfg)  # before any rendezvous: nothing to wait for


def test_the_engine_runs_only_on_rank_0(tmp_path):
    path = make_tiny("mixtral", 0, str(tmp_path), num_hidden_layers=1)
    cfg = EngineConfig(
        model=ModelConfig(model=path),
        cache=CacheConfig(num_blocks=8),
        parallel=ParallelConfig(ep_size=2, ep_rank=1, init_method="tcp://127.0.0.1:1"),
    )
    with pytest.raises(ValueError, match="run_expert_worker"):
        build_engine_core(cfg)


def test_half_of_the_experts_alone_do_not_reproduce_the_model(tmp_path):
    """A control for the 2-process equality test: without the all-reduce, one rank's output differs,
    so equal outputs there show that the combine did its job."""
    path = make_tiny("mixtral", 1, str(tmp_path))
    prompts = prompts_of([9, 21], seed=7)
    full, _ = run_engine(engine_model(path), prompts, 8)
    half, _ = run_engine(
        engine_model(path, parallel=ParallelConfig(ep_size=2, init_method="tcp://127.0.0.1:1")), prompts, 8
    )
    assert full != half
