"""Frozen engine configs: each component receives its own sub-config.

Constructors do no I/O, so a scheduler can be built in a test without a
checkpoint. Values are checked in ``__post_init__`` and a bad one raises
``ValueError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16")
EFFORTS = ("none", "low", "medium", "high")
BACKENDS = ("gloo", "nccl")
ENGINE_BACKENDS = ("native", "vllm")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
EXECUTORS = ("ray", "mp", "uni")
# The native engine's paged attention (kernels.backend): "cpu" (tiled for long contexts, on CPU or CUDA
# tensors), "cpu_untiled" (one gather of the whole context per layer: the path before tiling) or "reference".
ATTENTION_BACKENDS = ("cpu", "cpu_untiled", "cpu_sdpa", "reference")
# The native engine's linears (kernels.backend): "cpu" (float32 weights packed for oneDNN on the CPU; the
# int8/int4 kernels; elsewhere F.linear) or "reference" (F.linear; quantized: dequantized).
LINEAR_BACKENDS = ("cpu", "cpu_weight_only", "reference")
# Weight-only quantization of the native engine's linears at load (engine/native/models/prepare.py).
QUANTIZATIONS = ("none", "int8", "int4")


class DeviceUnavailableError(RuntimeError):
    """``model.device`` names a device this process cannot see; raised at start, before any weight is read.

    Defined here, without torch, so a launcher (a Ray rank) can catch it and name its own key.
    """


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to run and how. ``model=None`` is the embedded default."""

    model: str | None = None  # HF folder (config.json + safetensors) or a .gguf file
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    # Where weights, KV cache and step tensors live: "cpu", "cuda" or "cuda:N". None: "cpu" for the
    # native engine; the vllm backend's own platform (its build decides).
    device: str | None = None
    attention_backend: str = "cpu"  # native engine only: one of ATTENTION_BACKENDS
    linear_backend: str = "cpu"  # native engine only: one of LINEAR_BACKENDS
    quantization: str = "none"  # native engine on CPU only: one of QUANTIZATIONS
    # Native engine: glibc's malloc keeps freed blocks of up to 32 MiB for reuse (engine/native/allocator.py)
    # instead of unmapping them, so a step's large tensors do not fault their pages in anew each step.
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        _check(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"must be one of {QUANTIZATIONS}, got {self.quantization!r}",
        )
        _check(
            self.quantization == "none" or self.device in (None, "cpu"),
            "quantization",
            f"{self.quantization!r} runs on PyTorch's CPU kernels; it needs device: cpu, not {self.device!r}",
        )
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            "attention_backend",
            f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}",
        )
        _check(
            self.linear_backend in LINEAR_BACKENDS,
            "linear_backend",
            f"must be one of {LINEAR_BACKENDS}, got {self.linear_backend!r}",
        )
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")
        _check(
            self.device is None or _is_device(self.device),
            "device",
            f"must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )


def _is_device(name: str) -> bool:
    kind, _, index = name.partition(":")
    return name == "cpu" or (kind == "cuda" and (not index and ":" not in name or index.isdigit()))


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots."""

    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_memory_bytes holds
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size > 0, "block_size", "must be positive")
        _check(
            self.num_blocks is None or self.num_blocks >= 2, "num_blocks", "must be at least 2 (one is the null block)"
        )
        _check(self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes", "must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    """Token budget per step and how many sequences may run at once."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    # A prefill chunk of one request takes at most this many tokens of a step
    # (0: no cap beyond the step budget). Lets several prompts share a step.
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs", "must be positive")
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be positive")
        _check(self.max_model_len > 0, "max_model_len", "must be positive")
        _check(self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold", "must be >= 0")


@dataclass(frozen=True)
class ReasoningConfig:
    """Thinking spans: the marker strings and the token budget per effort.

    Markers are text; the tokenizer turns them into token ids (one special
    token for Mistral's ``[THINK]``, several ordinary tokens elsewhere).
    ``think_start=None`` picks ``[THINK]``/``[/THINK]`` when the tokenizer
    has them and ``<think>``/``</think>`` otherwise.
    """

    think_start: str | None = None
    think_end: str | None = None
    # Marker token ids, for models without a tokenizer (tiny test checkpoints).
    think_start_ids: tuple[int, ...] | None = None
    think_end_ids: tuple[int, ...] | None = None
    budget_low: int = 128
    budget_medium: int = 512
    budget_high: int = 2048
    default_effort: str = "none"

    def __post_init__(self) -> None:
        for name in ("budget_low", "budget_medium", "budget_high"):
            _check(getattr(self, name) > 0, name, "must be positive")
        _check(self.default_effort in EFFORTS, "default_effort", f"must be one of {EFFORTS}")
        _check(
            (self.think_start is None) == (self.think_end is None),
            "think_start",
            "set both think_start and think_end, or neither",
        )

    def budget(self, effort: str) -> int:
        """Thinking tokens allowed for ``effort`` (0 for ``none``)."""
        return {"none": 0, "low": self.budget_low, "medium": self.budget_medium, "high": self.budget_high}[effort]


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism: ranks in a group, which one this process is, and how they meet.

    Every rank gets the same config except ``ep_rank``. Rank 0 drives the engine
    and hosts the rendezvous at ``init_method``, unless ``store_hosted``: then
    whoever launched the ranks hosts it there (``engine.api.host_rendezvous``,
    bound before any rank starts) and every rank joins as a client.
    ``timeout_s`` bounds every collective, so a dead or stuck peer fails the
    group instead of hanging it.
    """

    ep_size: int = 1
    ep_rank: int = 0
    backend: str = "gloo"  # torch.distributed backend: "gloo" (CPU) or "nccl" (GPU)
    init_method: str | None = None  # rendezvous URL, e.g. "tcp://10.0.0.5:29500"; needed when ep_size > 1
    store_hosted: bool = False  # True: the launcher hosts the store at init_method (engine.api.host_rendezvous)
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.ep_size >= 1, "ep_size", "must be >= 1")
        _check(0 <= self.ep_rank < self.ep_size, "ep_rank", f"must be in [0, {self.ep_size})")
        _check(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        _check(self.timeout_s > 0, "timeout_s", "must be positive")
        _check(
            self.ep_size == 1 or bool(self.init_method),
            "init_method",
            "is required when ep_size > 1 (e.g. 'tcp://127.0.0.1:29500')",
        )
        _check(
            self.init_method is None or "://" in self.init_method,
            "init_method",
            f"must be a URL such as 'tcp://host:port', got {self.init_method!r}",
        )


# Engine arguments that Levante sets itself from its own sub-configs; extra_args may not repeat them.
VLLM_OWNED_ARGS = (
    "model",
    "tokenizer",
    "skip_tokenizer_init",
    "dtype",
    "max_model_len",
    "seed",
    "enable_prefix_caching",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory_bytes",
    "logits_processors",
    "disable_log_stats",
)

Scalar = str | int | float | bool


@dataclass(frozen=True)
class VllmConfig:
    """vLLM's engine arguments, passed through when ``backend`` is ``vllm``.

    Model, dtype, lengths, cache and batch sizes come from the other
    sub-configs, so both backends read the same keys. ``extra_args`` takes any
    other ``AsyncEngineArgs`` field; names are checked against vLLM's when the
    engine starts.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # None: the KV cache takes cache.kv_cache_memory_bytes; set it on GPUs (e.g. 0.9)
    gpu_memory_utilization: float | None = None
    quantization: str | None = None  # None: what the checkpoint says (FP8 for Mistral Small 4)
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False  # True: no torch.compile / CUDA graphs (faster start, slower steps)
    attention_backend: str | None = None  # e.g. "FLASH_ATTN_MLA"; None: vLLM's choice
    distributed_executor_backend: str | None = None  # None: vLLM's choice; "ray" inside a Ray placement group
    extra_args: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(
            self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}",
        )
        _check(
            self.distributed_executor_backend in (None, *EXECUTORS),
            "distributed_executor_backend",
            f"must be one of {EXECUTORS} or null, got {self.distributed_executor_backend!r}",
        )
        typed = {f for f in self.__dataclass_fields__ if f != "extra_args"}
        for key in self.extra_args:
            _check(
                key not in VLLM_OWNED_ARGS,
                f"extra_args.{key}",
                "is set by Levante from the engine's other keys (model, cache, scheduler)",
            )
            _check(key not in typed, f"extra_args.{key}", f"set it as vllm.{key} instead")

    @property
    def world_size(self) -> int:
        """Devices one engine uses (vLLM's workers per replica)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "native"  # "native": Levante's paged-attention engine; "vllm": vLLM's AsyncLLM
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self) -> None:
        _check(self.backend in ENGINE_BACKENDS, "backend", f"must be one of {ENGINE_BACKENDS}, got {self.backend!r}")
        if self.backend == "native":
            _check(self.vllm == VllmConfig(), "vllm", "is read only with backend: vllm")
        else:
            _check(
                self.model.quantization == "none",
                "model.quantization",
                "is the native engine's; with backend: vllm use vLLM's own quantized checkpoints",
            )
            _check(
                self.parallel.ep_size == 1,
                "parallel.ep_size",
                "must be 1 with backend: vllm (vLLM splits the experts itself: vllm.enable_expert_parallel)",
            )
