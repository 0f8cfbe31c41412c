"""vLLM's own figures as ``EngineStats``: a stat logger that keeps the latest scheduler and iteration stats."""

from __future__ import annotations

import threading
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from engine.config import CacheConfig
from engine.types import EngineStats


class StatsRecorder:
    """Totals since start, from what vLLM's engine reports after each of its steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # vLLM records from its output handler; stats() reads from anywhere
        self.num_running = self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.num_preemptions = self.num_generated = self.num_prompt = 0
        self.prefix_queries = self.prefix_hits = 0

    def factory(self, vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        """What ``AsyncLLM(stat_loggers=[...])`` calls to build the logger for one engine."""
        del vllm_config, engine_index
        return _Logger(self)

    def record(self, scheduler: Any, iteration: Any) -> None:
        with self._lock:
            if scheduler is not None:
                self.num_running, self.num_waiting = scheduler.num_running_reqs, scheduler.num_waiting_reqs
                self.kv_cache_usage = float(scheduler.kv_cache_usage)
                if not scheduler.prefix_cache_stats.reset:
                    self.prefix_queries += scheduler.prefix_cache_stats.queries
                    self.prefix_hits += scheduler.prefix_cache_stats.hits
            if iteration is not None:
                self.num_preemptions += iteration.num_preempted_reqs
                self.num_generated += iteration.num_generation_tokens
                self.num_prompt += iteration.num_prompt_tokens

    def engine_stats(self, cache: CacheConfig, num_blocks: int, block_size: int) -> EngineStats:
        """``num_blocks``: vLLM's KV blocks; bytes are known when the cache size is (not with gpu_memory_utilization)."""
        with self._lock:
            used = round(self.kv_cache_usage * num_blocks)
            per_block = cache.kv_cache_memory_bytes // num_blocks if num_blocks else 0
            return EngineStats(
                num_running=self.num_running,
                num_waiting=self.num_waiting,
                num_preemptions=self.num_preemptions,
                block_size=block_size,
                num_blocks=num_blocks,
                num_used_blocks=used,
                kv_cache_bytes=per_block * num_blocks,
                kv_bytes_per_block=per_block,
                kv_used_bytes=used * per_block,
                kv_cache_usage=self.kv_cache_usage,
                prefix_cache_hit_rate=self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
                num_generated_tokens=self.num_generated,
                num_prompt_tokens=self.num_prompt,
                prefix_cache_queried_tokens=self.prefix_queries,
                prefix_cache_hit_tokens=self.prefix_hits,
            )


class _Logger(StatLoggerBase):
    def __init__(self, recorder: StatsRecorder) -> None:
        self.recorder = recorder

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        self.recorder.record(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        pass
