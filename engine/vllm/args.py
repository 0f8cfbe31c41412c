"""``EngineConfig`` -> vLLM's ``AsyncEngineArgs`` keywords: both backends read the same keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.config import EngineConfig

PROCESSOR = "engine.vllm.processor:ReasoningLogitsProcessor"


def engine_kwargs(config: EngineConfig, model_dir: str, max_model_len: int) -> dict[str, Any]:
    """Keyword arguments for ``AsyncEngineArgs``."""
    # cache.block_size stays the native engine's: vLLM's attention backends each need their own
    # (a multiple of 32 on CPU); extra_args.block_size sets it.
    v, cache, sched = config.vllm, config.cache, config.scheduler
    kwargs: dict[str, Any] = dict(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype=config.model.dtype,
        max_model_len=max_model_len,
        seed=0,
        enable_prefix_caching=cache.enable_prefix_caching,
        max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        logits_processors=[PROCESSOR],
        disable_log_stats=False,
        tensor_parallel_size=v.tensor_parallel_size,
        pipeline_parallel_size=v.pipeline_parallel_size,
        data_parallel_size=v.data_parallel_size,
        enable_expert_parallel=v.enable_expert_parallel,
        kv_cache_dtype=v.kv_cache_dtype,
        enforce_eager=v.enforce_eager,
        # the reasoning processor reads each row's output tokens before the step that extends them
        async_scheduling=False,
    )
    if v.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = v.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = cache.kv_cache_memory_bytes
    for name in ("quantization", "attention_backend"):
        if getattr(v, name) is not None:
            kwargs[name] = getattr(v, name)
    if v.distributed_executor_backend is not None:  # None: vLLM picks ray inside a Ray placement group
        kwargs["distributed_executor_backend"] = v.distributed_executor_backend
    return {**kwargs, **v.extra_args}


def check_extra_args(extra: dict[str, Any], known: set[str], version: str) -> None:
    """ValueError naming the first ``engine.vllm.extra_args`` key vLLM does not take."""
    for key in extra:
        if key not in known:
            raise ValueError(f"vllm.extra_args.{key}: not an engine argument of vLLM {version}")


def known_engine_args() -> set[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}
