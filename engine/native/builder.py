"""Build a native ``EngineCore`` from a config: read the model and its tokenizer, size the KV cache and the
longest sequence, allocate, and join the expert-parallel group.

Everything that reads files, takes memory or waits on other ranks happens
here, once, in this order: the device is checked (an unseen GPU fails before
anything is read), the checkpoint is found and loaded, the limits resolved,
the KV cache allocated, admission built (tokenizer, end-of-text ids,
thinking markers), and last the expert-parallel group joined, only once
everything local has worked. ``EngineCore`` takes the parts as they are.
Sizes computed here never overwrite the config: they travel as ``EngineLimits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.admission import Admission, model_max_len
from engine.checkpoint.folder import resolve_model_dir
from engine.checkpoint.gguf import default_model_path
from engine.config import EngineConfig
from engine.core.scheduler import max_len_within_cache
from engine.native.allocator import keep_freed_memory
from engine.native.device import engine_device
from engine.native.engine_core import EngineCore, EngineLimits, EngineParts
from engine.native.models.base import CausalLM
from engine.native.models.loader import load_model
from engine.native.runner import ModelRunner


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM  # on ``model.device``, weights loaded (this rank's experts only under expert parallelism)
    model_path: str  # as the config gave it (a folder, .gguf or tiny: URI), the embedded default's when none
    model_dir: str  # the Hugging Face folder behind it (where the tokenizer is too)
    hf_config: dict  # its (text) model's config.json


def load_native_model(config: EngineConfig) -> LoadedModel:
    """The model a config names, loaded; what every rank of a group does first."""
    engine_device(config.model.device)  # before anything is read: an unseen GPU fails fast
    if config.model.num_threads:
        torch.set_num_threads(config.model.num_threads)
    if config.model.keep_freed_memory:
        keep_freed_memory()
    model_path = config.model.model or default_model_path()
    model_dir = resolve_model_dir(model_path)
    model, hf_config = load_model(
        model_dir, config.model, config.parallel, attention_backend=config.model.attention_backend
    )
    return LoadedModel(model, model_path, model_dir, hf_config)


def resolve_limits(config: EngineConfig, model: CausalLM, hf_config: dict) -> EngineLimits:
    """KV blocks from ``cache.num_blocks`` or the memory budget; the longest sequence the model and the cache allow."""
    block_size = config.cache.block_size
    spec = model.kv_cache_spec()
    kv_bytes_per_block = spec.bytes_per_block(block_size)
    # +1: block 0 is the null block that pads block tables
    num_blocks = config.cache.num_blocks or config.cache.kv_cache_memory_bytes // kv_bytes_per_block + 1
    longest = model_max_len(config.model.max_model_len, hf_config)
    max_len = max_len_within_cache(longest, num_blocks, block_size, spec.sliding_window)
    return EngineLimits(num_blocks, block_size, kv_bytes_per_block, max_len, spec.sliding_window)


def build_engine_core(config: EngineConfig) -> EngineCore:
    """Load, size and allocate everything an ``EngineCore`` runs with (blocks for the group under ``ep_size > 1``)."""
    loaded = load_native_model(config)
    hf = loaded.hf_config
    limits = resolve_limits(config, loaded.model, hf)
    runner = ModelRunner(loaded.model, limits.num_blocks, limits.block_size)
    admission = Admission.for_model(config, loaded.model_dir, hf, limits.max_model_len)
    architecture = (hf.get("architectures") or [type(loaded.model).__name__])[0]
    vocab_size = int(hf["vocab_size"])
    broadcaster = None
    if config.parallel.ep_size > 1:  # last: join the group only once everything local has worked
        from engine.native.parallel.driver import start_driver
        from engine.native.parallel.wire import Hello

        hello = Hello(
            limits.num_blocks, limits.block_size, limits.max_model_len, vocab_size, loaded.model.num_expert_params()
        )
        broadcaster = start_driver(loaded.model, config.parallel, hello)
        runner.step_sink = broadcaster
    parts = EngineParts(loaded.model_path, architecture, vocab_size, runner, admission, limits, broadcaster)
    return EngineCore(config, parts)
