"""Continuous-batching scheduler over a paged KV cache.

One rule, as in vLLM v1: each step, a request's ``num_computed_tokens``
catches up with its ``num_tokens`` as far as the token budget allows. A
prompt is many tokens behind (prefill, chunked by the budget), a decode is
one behind, a prefix hit jumps ahead, and a preempted request drops back to
zero and recomputes. There are no separate prefill/decode phases. With a
sliding window, the blocks behind a request's window go back to the pool as
it advances (``engine.core.kv_cache``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.config import CacheConfig, SchedulerConfig
from engine.core.kv_cache import KVCacheManager, window_fits
from engine.core.request import Request, RequestStatus, finish_reason, is_finished
from engine.core.stop import check_token

_STATUS_OF = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}


@dataclass
class ScheduledSeq:
    """One request's share of a step: compute ``token_ids`` at positions
    ``start_pos .. start_pos + len(token_ids) - 1``."""

    request_id: str
    token_ids: list[int]  # all_token_ids[start_pos : start_pos + n]
    start_pos: int  # tokens already in the cache (context before this chunk)
    # The request's whole block table, position p -> block_ids[p // block_size]; the null block 0
    # where its sliding window dropped a block (no query of this chunk sees those positions).
    block_ids: list[int]
    samples: bool  # the chunk reaches the last known token: sample a next one
    # The chunk covers prompt positions of a prompt_logprobs request whose
    # logprobs were not sent yet (each prompt position is flagged exactly once,
    # also across a recompute after preemption).
    wants_prompt_logprobs: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]  # running requests first, then newly admitted ones
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    stop_reason: int | str | None = None  # the stop token id / string, None for eos
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions_total: int
    kv_usage: float
    num_used_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found


def max_len_within_cache(
    max_model_len: int, num_blocks: int, block_size: int, sliding_window: int | None = None
) -> int:
    """``max_model_len``, capped by what ``num_blocks`` blocks hold (the null block aside).

    A sequence longer than the whole cache could never run, even alone (it
    would be preempted and re-admitted forever), so such a cache caps the
    length: requests then finish with "length" at capacity. A sliding-window
    model whose window fits the cache is not capped: a request holds only its
    window and its chunk.
    """
    if window_fits(num_blocks, block_size, sliding_window):
        return max_model_len
    return min(max_model_len, (num_blocks - 1) * block_size)


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int | None = None,
        sliding_window: int | None = None,
    ) -> None:
        """``max_model_len``: the longest sequence the engine resolved for its model (None: the config's).
        ``sliding_window``: the model's attention window; blocks behind it go back to the pool."""
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        asked = scheduler_config.max_model_len if max_model_len is None else max_model_len
        self.max_model_len = max_len_within_cache(asked, num_blocks, self.block_size, sliding_window)
        self._capped_by_cache = self.max_model_len < asked
        self.kv = KVCacheManager(
            self.block_size, num_blocks, cache_config.enable_prefix_caching, self.max_model_len, sliding_window
        )
        self.requests: dict[str, Request] = {}  # unfinished only
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0

    # ---- requests in and out -------------------------------------------------

    def add_request(self, request: Request) -> None:
        n, limit = request.num_tokens, self.max_model_len
        if n >= limit:
            capped = f", capped by a KV cache of {limit} tokens" if self._capped_by_cache else ""
            raise ValueError(
                f"prompt: {n} tokens exceeds max_model_len {limit}{capped} "
                f"(at most {limit - 1}, leaving room for one generated token)"
            )
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in the scheduler")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: str | Iterable[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(
        self, request_ids: str | Iterable[str], status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        """End requests now (abort, or a stop string found by the detokenizer).
        Blocks are freed at once; unknown or already finished ids are ignored."""
        assert is_finished(status), status
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        for rid in ids:
            req = self.requests.get(rid)
            if req is not None:
                req.stop_reason = stop_reason
                self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self._remove_from_queue(req)
        req.status = status
        self.kv.free(req)
        del self.requests[req.request_id]

    def _remove_from_queue(self, req: Request) -> None:
        # Waiting covers never-admitted and preempted requests (the latter
        # also when a schedule() preempted it between a step and its update).
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> SchedulerStats:
        pool = self.kv.pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions_total=self.num_preemptions_total,
            kv_usage=self.kv.usage,
            num_used_blocks=self.kv.num_used_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_cache_queries=pool.prefix_cache_queries,
            prefix_cache_hits=pool.prefix_cache_hits,
        )

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    # ---- one step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, seqs, preempted)
        # After a preemption the pool is tight: admitting would only thrash.
        if not preempted:
            budget = self._schedule_waiting(budget, seqs)
        return SchedulerOutput(
            seqs=seqs,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_ids=preempted,
        )

    def _chunk(self, req: Request, budget: int, num_hit: int = 0) -> int:
        """Tokens of ``req`` to compute this step, after ``num_hit`` prefix-hit tokens."""
        start = req.num_computed_tokens + num_hit
        n = min(req.num_tokens - start, budget)
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        # The chunk must fit the pool beside the window it needs, or a prompt
        # longer than the cache (sliding window) could never start.
        n = min(n, self.kv.max_chunk_tokens(start))
        # Recompute of a prompt_logprobs request: end the chunk where unsent
        # prompt logprobs begin, so each prompt position is flagged once.
        if start < req.prompt_logprobs_pos < start + n:
            n = req.prompt_logprobs_pos - start
        return n

    def _schedule_running(self, budget: int, seqs: list[ScheduledSeq], preempted: list[str]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, budget)
            if n > 0:  # 0: all known tokens computed, waiting for its sample
                if not self._try_allocate_or_preempt(req, n, preempted):
                    break  # req itself was preempted; everything after it already was
                seqs.append(self._schedule_seq(req, n))
                budget -= n
            i += 1
        return budget

    def _try_allocate_or_preempt(self, req: Request, n: int, preempted: list[str]) -> bool:
        """Make room for ``n`` more tokens of running ``req`` by preempting
        from the back of ``running``. False if ``req`` itself got preempted."""
        while self.kv.allocate_slots(req, n) is None:
            victim = self.running.pop()  # requests before req were scheduled already; never them
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        # Recompute, not swap: drop the KV; its full blocks stay cached in the
        # free queue, so re-admission often gets them back as prefix hits.
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)

    def _schedule_waiting(self, budget: int, seqs: list[ScheduledSeq]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else ([], 0)
            n = self._chunk(req, budget, num_hit)
            if self.kv.allocate_slots(req, n, hits) is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens += num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._schedule_seq(req, n))
            budget -= n
        return budget

    def _schedule_seq(self, req: Request, n: int) -> ScheduledSeq:
        """Describe the next ``n`` tokens of ``req`` and count them as computed,
        so the next schedule (possibly before this step's update) sees them."""
        start = req.num_computed_tokens
        req.num_computed_tokens += n
        wants_prompt_logprobs = (
            req.sampling_params.prompt_logprobs is not None and start == req.prompt_logprobs_pos < req.num_prompt_tokens
        )
        if wants_prompt_logprobs:
            req.prompt_logprobs_pos = min(start + n, req.num_prompt_tokens)
        return ScheduledSeq(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start : start + n],
            start_pos=start,
            block_ids=self.kv.get_block_ids(req.request_id),
            samples=start + n == req.num_tokens,
            wants_prompt_logprobs=wants_prompt_logprobs,
        )

    # ---- results back in -----------------------------------------------------

    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[EngineCoreOutput]:
        """Append sampled tokens of the seqs that sampled; finish and free
        those that hit a stop condition (``engine.core.stop``)."""
        outs: list[EngineCoreOutput] = []
        for seq in output.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or not seq.samples:
                continue  # aborted since schedule(), or a prefill chunk that samples nothing
            new_ids, status = self._append_until_stop(req, sampled[seq.request_id])
            if status is not None:
                self._finish(req, status)
            outs.append(
                EngineCoreOutput(
                    seq.request_id,
                    new_ids,
                    finish_reason(status) if status else None,
                    req.stop_reason,
                    max(req.num_cached_tokens, 0),
                )
            )
        return outs

    def _append_until_stop(self, req: Request, token_ids: list[int]) -> tuple[list[int], RequestStatus | None]:
        """Append tokens one by one; tokens after a stop are dropped."""
        for k, t in enumerate(token_ids):
            req.append_output_token_ids(t)
            stop = check_token(
                t, req.sampling_params, req.eos_token_id, req.num_output_tokens, req.num_tokens, self.max_model_len
            )
            if stop is not None:
                req.stop_reason = stop.stop_reason
                return list(token_ids[: k + 1]), _STATUS_OF[stop.finish_reason]
        return list(token_ids), None
