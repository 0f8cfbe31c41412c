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

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots."""

    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_memory_bytes holds
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size > 0, "block_size", "must be positive")
        _check(self.num_blocks is None or self.num_blocks >= 2, "num_blocks", "must be at least 2 (one is the null block)")
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
        _check((self.think_start is None) == (self.think_end is None), "think_start", "set both think_start and think_end, or neither")

    def budget(self, effort: str) -> int:
        """Thinking tokens allowed for ``effort`` (0 for ``none``)."""
        return {"none": 0, "low": self.budget_low, "medium": self.budget_medium, "high": self.budget_high}[effort]


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism: ranks in a group, which one this process is, and how they meet.

    Every rank gets the same config except ``ep_rank``. Rank 0 drives the engine
    and hosts the rendezvous at ``init_method``; ``timeout_s`` bounds every
    collective, so a dead or stuck peer fails the group instead of hanging it.
    """

    ep_size: int = 1
    ep_rank: int = 0
    backend: str = "gloo"  # torch.distributed backend: "gloo" (CPU) or "nccl" (GPU)
    init_method: str | None = None  # rendezvous URL, e.g. "tcp://10.0.0.5:29500"; needed when ep_size > 1
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.ep_size >= 1, "ep_size", "must be >= 1")
        _check(0 <= self.ep_rank < self.ep_size, "ep_rank", f"must be in [0, {self.ep_size})")
        _check(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        _check(self.timeout_s > 0, "timeout_s", "must be positive")
        _check(self.ep_size == 1 or bool(self.init_method), "init_method",
               "is required when ep_size > 1 (e.g. 'tcp://127.0.0.1:29500')")
        _check(self.init_method is None or "://" in self.init_method, "init_method",
               f"must be a URL such as 'tcp://host:port', got {self.init_method!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
