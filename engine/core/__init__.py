"""Torch-free engine core: requests, KV block accounting and the scheduler.

Nothing here may import torch or numpy (a test checks it in a fresh process),
so the scheduler can be built and tested without a model.
"""

from engine.core.block_pool import BlockPool, KVCacheBlock, compute_block_hashes, hash_block_tokens
from engine.core.kv_cache import KVCacheManager
from engine.core.request import Request, RequestStatus, SamplingParams, finish_reason, is_finished
from engine.core.scheduler import EngineCoreOutput, ScheduledSeq, Scheduler, SchedulerOutput, SchedulerStats

__all__ = [
    "BlockPool", "KVCacheBlock", "compute_block_hashes", "hash_block_tokens",
    "KVCacheManager",
    "Request", "RequestStatus", "SamplingParams", "finish_reason", "is_finished",
    "EngineCoreOutput", "ScheduledSeq", "Scheduler", "SchedulerOutput", "SchedulerStats",
]
