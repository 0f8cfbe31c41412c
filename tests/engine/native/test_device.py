"""``model.device``: the native engine on the CPU and, where one is visible, on a CUDA device.

Every case runs for ``cpu`` and for ``cuda`` (marked ``gpu``: ``pytest -m gpu`` runs exactly those on a
GPU machine; without one they skip, saying why). On the device the engine must give transformers'
logits (fp32, < 1e-4) and the CPU engine's greedy tokens, and keep weights, KV cache and every step
tensor there. Without CUDA, ``device="cuda"`` is refused at start, before any weight is read; an
explicit ``"cpu"`` is exactly the default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from engine.config import (
    CacheConfig,
    DeviceUnavailableError,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from engine.core.request import SamplingParams
from engine.llm import LLM
from engine.native.builder import build_engine_core
from engine.native.device import engine_device
from engine.native.engine_core import EngineCore
from engine.native.models.layers import FusedLinear
from engine.native.models.loader import load_model
from engine.native.runner import StepInputs
from engine.output import collect_output
from tests.devices import DEVICES, no_cuda_reason, usable
from tests.engine.native.models.helpers import engine_model, hf_logits, hf_model, max_abs_diff, prompts_of, run_engine

ARCHS = ["mistral", "mixtral", "mistral4"]
INIT = "tcp://127.0.0.1:1"  # never dialled: every start here fails before the rendezvous
TOL = 1e-4
DECODE = 8


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return usable(request.param)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> tiny checkpoint path, written once per module on first use."""
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            made[arch] = make_tiny(arch, seed=3, out=str(tmp_path_factory.mktemp(f"dev_{arch}")))
        return made[arch]

    return get


def engine_config(path: str, device: str | None, step_tokens: int = 32, **parallel) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=path, device=device),
        cache=CacheConfig(num_blocks=64, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=step_tokens),
        parallel=ParallelConfig(**parallel),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_transformers_on_the_device(arch, device, checkpoints):
    """Varlen prefill of 3 prompts then 8 batched greedy decodes, against transformers on the CPU."""
    path = checkpoints(arch)
    tokens, logits = run_engine(engine_model(path, device=device), prompts_of([6, 17, 30]), DECODE)
    ref = hf_model(arch, path)
    for seq, got in zip(tokens, logits):
        assert got.device.type == device
        expected = hf_logits(ref, seq)
        diff = max_abs_diff(got, expected)
        print(f"{arch} on {device}: seq len {len(seq)} max abs diff {diff:.2e}")
        assert diff < TOL, f"{arch} on {device}: max abs diff {diff:.3e}"
        prompt_len = len(seq) - DECODE
        assert seq[prompt_len:] == expected[prompt_len - 1 : -1].argmax(-1).tolist()


def _device_types(core: EngineCore) -> dict[str, set[str]]:
    """Where each kind of engine tensor lives, by device type."""
    model = core.model
    # not parameters: the parts' parameters are views of them
    fused = [v.weight for m in model.modules() for v in vars(m).values() if isinstance(v, FusedLinear)]
    return {
        "parameters": {p.device.type for p in model.parameters()},
        "buffers": {b.device.type for b in model.buffers()},
        "fused weights": {t.device.type for t in fused},
        "kv cache": {t.device.type for layer in core.runner.kv_caches for t in layer},
    }


@pytest.mark.parametrize("arch", ["mixtral", "mistral4"])
def test_weights_cache_and_step_tensors_live_on_the_device(arch, device, checkpoints):
    core = build_engine_core(engine_config(checkpoints(arch), device))
    assert _device_types(core) == {k: {device} for k in ("parameters", "buffers", "fused weights", "kv cache")}
    assert core.device.type == core.runner.device.type == device

    # two sequences, one prefilling 3 tokens and one decoding: the metadata and hidden states stay there
    hidden, meta = core.runner.forward(StepInputs([5, 6, 7, 8], [0, 1, 2, 0], [3, 1], [3, 1], [[1], [2]]))
    fields = ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")
    assert {name: getattr(meta, name).device.type for name in fields} == dict.fromkeys(fields, device)
    assert hidden.device.type == device

    # through a whole request: seeded sampling with logprobs and prompt logprobs draws on the device
    seen: list[str] = []
    core.runner.logits_hook = lambda ids, logits: seen.append(logits.device.type)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    prompt_ids = core.add_request("r", [5, 6, 7, 9], params)
    deltas = []
    while core.has_unfinished_requests():
        deltas += core.step()
    out = collect_output(prompt_ids, params, deltas)
    assert seen == [device] * 3
    assert core.runner.sampler._generator.device.type == device
    assert len(out.token_ids) == 3 and all(isinstance(t, int) for t in out.token_ids)
    assert len(out.logprobs) == 3 and len(out.prompt_logprobs) == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_the_cpu_engine(arch, device, checkpoints):
    path = checkpoints(arch)
    prompts = prompts_of([5, 13, 24], seed=5)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    on_cpu = LLM(config=engine_config(path, "cpu")).generate(prompts, params)
    on_device = LLM(config=engine_config(path, device)).generate(prompts, params)
    for c, d in zip(on_cpu, on_device):
        assert len(set(c.token_ids)) > 3  # a lively sequence, so equality means something
        assert d.token_ids == c.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(c.logprobs, d.logprobs)) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_no_step_tensor_is_made_on_the_default_device(arch, checkpoints):
    """What a CPU machine can check of a GPU run: with torch's default device set to ``meta``, a step
    tensor made without the engine's device would be a meta tensor, and the first op mixing it with the
    CPU weights would raise. Covers chunked prefill beside decodes, seeded and top-k sampling, logprobs
    and prompt logprobs, and the reference kernels."""
    core = build_engine_core(engine_config(checkpoints(arch), None, step_tokens=8))
    core.add_request(
        "a",
        list(range(5, 20)),
        SamplingParams(temperature=0.7, seed=1, max_tokens=4, logprobs=2, prompt_logprobs=1, ignore_eos=True),
    )
    core.add_request("b", [5, 6], SamplingParams(temperature=0.7, top_k=5, max_tokens=6, ignore_eos=True))
    reference, prompts = engine_model(checkpoints(arch), backend="reference"), prompts_of([5, 9])
    generated: dict[str, list[int]] = {"a": [], "b": []}
    with torch.device("meta"):
        while core.has_unfinished_requests():
            for d in core.step():
                generated[d.request_id] += d.token_ids
        tokens, _ = run_engine(reference, prompts, 2, chunk=4)
    assert [len(generated[r]) for r in "ab"] == [4, 6]
    assert [len(t) for t in tokens] == [7, 11]


def test_explicit_cpu_is_exactly_the_default(checkpoints):
    """``device="cpu"`` and ``device=None``: the same tokens and bit-identical logprobs, greedy and seeded."""
    path = checkpoints("mixtral")
    prompts = prompts_of([4, 19], seed=9)
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True, logprobs=3),
    ]
    default = LLM(config=engine_config(path, None))
    explicit = LLM(config=engine_config(path, "cpu"))
    assert default.engine.device == explicit.engine.device == torch.device("cpu")
    for a, b in zip(default.generate(prompts, params), explicit.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        assert [lp.logprob for lp in a.logprobs] == [lp.logprob for lp in b.logprobs]
        assert [lp.top for lp in a.logprobs] == [lp.top for lp in b.logprobs]


def _no_cuda_message(asked: str) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    return (
        f"model.device: {asked!r} was asked for but this process sees no CUDA device "
        f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible})"
    )


def test_cuda_without_a_cuda_device_is_refused_before_any_weight_is_read(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    nowhere = str(tmp_path / "no-such-model")  # reading it would raise ModelLoadError instead
    single = engine_config(nowhere, "cuda")
    worker = engine_config(nowhere, "cuda:0", ep_size=2, ep_rank=1, init_method=INIT)
    from engine.native.parallel.worker import ExpertWorker

    for start, asked in (
        (lambda: build_engine_core(single), "cuda"),
        (lambda: load_model(nowhere, single.model), "cuda"),
        (lambda: ExpertWorker(worker), "cuda:0"),
    ):
        with pytest.raises(DeviceUnavailableError) as refused:
            start()
        assert str(refused.value) == _no_cuda_message(asked)
        assert "\n" not in str(refused.value)


def test_a_cuda_index_beyond_the_visible_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        DeviceUnavailableError,
        match=r"^model.device: 'cuda:1' was asked for but this process "
        r"sees 1 CUDA device\(s\) \(torch ",
    ):
        engine_device("cuda:1")
    assert engine_device(None) == engine_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "mistral4"])
def test_two_ranks_over_nccl_generate_what_one_gpu_generates(arch, checkpoints):
    """Rank 0 on cuda:0, rank 1 on cuda:1, NCCL between them: the single-GPU engine's greedy tokens."""
    reason = no_cuda_reason(need=2)
    if reason is None and not torch.distributed.is_nccl_available():
        reason = f"torch {torch.__version__} was built without NCCL"
    if reason is not None:
        pytest.skip(reason)
    from engine.native.async_engine import AsyncEngine
    from tests.engine.native.parallel import ranks
    from tests.engine.native.parallel.test_processes import MAX_TOKENS, PROMPT_LENS, Group, config

    path = checkpoints(arch)
    prompts = prompts_of(PROMPT_LENS, seed=7)

    def on(cfg: EngineConfig, device: str) -> EngineConfig:
        return dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, device=device),
            parallel=dataclasses.replace(cfg.parallel, backend="nccl"),
        )

    single = AsyncEngine(build_engine_core(on(config(path), "cuda:0")))
    try:
        expected = asyncio.run(asyncio.wait_for(ranks.generate_all(single, prompts, MAX_TOKENS), 120))
    finally:
        single.shutdown()
    with ranks.rendezvous() as init, Group() as group:
        group.start("rank1", ranks.follow, on(config(path, 2, 1, init), "cuda:1"))
        group.start("rank0", ranks.drive, on(config(path, 2, 0, init), "cuda:0"), prompts, MAX_TOKENS)
        got = group.get("outputs", timeout=180)
        group.get("worker_done")
    for g, e in zip(got, expected):
        assert g["tokens"] == e["tokens"]
        assert max(abs(a - b) for a, b in zip(g["logprobs"], e["logprobs"])) < 1e-4


def test_the_group_moves_its_messages_where_its_backend_can():
    from engine.native.parallel.group import ExpertGroup, message_device

    nccl = ParallelConfig(ep_size=2, backend="nccl", init_method=INIT)
    assert message_device(nccl, torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert message_device(ParallelConfig(), torch.device("cuda", 0)) == torch.device("cpu")  # gloo: host memory
    with pytest.raises(ValueError, match=r"^parallel.backend: 'nccl' moves only CUDA tensors, but the model is on cpu"):
        ExpertGroup(nccl, torch.device("cpu"))
