"""Torch-free engine core: requests, KV block accounting and the scheduler.

Nothing here may import torch or numpy (a test checks it in a fresh process),
so the scheduler can be built and tested without a model.
"""

from engine.core.block_pool import BlockPool, KVCacheBlock, compute_block_hashes, hash_block_tokens
from engine.core.kv_cache import KVCacheManager
from engine.core.request import Request, RequestStatus, SamplingParams, finish_reason, is_finished
from engine.core.scheduler import EngineCoreOutput, ScheduledSeq, Scheduler, SchedulerOutput, SchedulerStats

__all__ = [
    "BlockPool",
    "EngineCoreOutput",
    "KVCacheBlock",
    "KVCacheManager",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerOutput",
    "SchedulerStats",
    "compute_block_hashes",
    "finish_reason",
    "hash_block_tokens",
    "is_finished",
]
