"""Prefill progress: a prompt prefilled in several chunks reports how far each chunk got, before its first token."""

from __future__ import annotations

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core.request import SamplingParams
from engine.native.builder import build_engine_core


def test_a_chunked_prefill_reports_its_progress_then_tokens(tmp_path):
    path = make_tiny("mistral", seed=3, out=str(tmp_path))
    core = build_engine_core(
        EngineConfig(
            model=ModelConfig(model=path),
            cache=CacheConfig(num_blocks=64, block_size=8),
            scheduler=SchedulerConfig(max_num_batched_tokens=16),
        )
    )
    prompt = list(range(3, 53))  # 50 tokens: chunks of 16, 16, 16, then 2 that sample
    core.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    deltas = []
    while core.has_unfinished_requests():
        deltas.extend(core.step())
    progress = [d for d in deltas if d.prompt_tokens_done is not None]
    assert [(d.prompt_tokens_done, d.prompt_tokens_total) for d in progress] == [(16, 50), (32, 50), (48, 50)]
    assert all(not d.token_ids and not d.finished for d in progress)
    first_token = next(i for i, d in enumerate(deltas) if d.token_ids)
    assert first_token == len(progress)  # every report came before the first token
    assert sum(len(d.token_ids) for d in deltas) == 3 and deltas[-1].finished
    # a prompt that fits one step reports nothing: its first delta has its first token
    core.add_request("short", prompt[:10], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    short = []
    while core.has_unfinished_requests():
        short.extend(core.step())
    assert all(d.prompt_tokens_done is None for d in short)
