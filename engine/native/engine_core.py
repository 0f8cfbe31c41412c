"""The synchronous engine: admit requests, then step = schedule, execute, update.

``EngineCore`` is single-threaded; ``LLM`` drives it in a loop and
``AsyncEngine`` drives it from a background thread. With
``parallel.ep_size > 1`` it is rank 0 of an expert-parallel group: its runner
broadcasts every step to ranks 1.. (``engine.native.parallel``), and whoever drives
it calls ``keepalive()`` while idle and ``close()`` at the end.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from engine.admission import Admission
from engine.config import EngineConfig
from engine.core.request import Request, RequestStatus, SamplingParams
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.native.runner import ModelRunner, StepResult
from engine.native.sampler import SampleRow, logprobs_of
from engine.output import RequestState, merge_final
from engine.tokenizer import Tokenizer
from engine.types import (
    EngineError,
    EngineInfo,
    EngineStats,
    Prompt,
    RequestDelta,
    RequestTimings,
    Resume,
    TokenLogprob,
)

if TYPE_CHECKING:
    from engine.native.parallel.broadcast import StepBroadcaster

__all__ = ["EngineCore", "EngineLimits", "EngineParts"]


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """Sizes resolved at start from the model, the config and the memory; the config itself is never rewritten."""

    num_blocks: int  # KV cache blocks, the null block 0 included
    block_size: int
    kv_bytes_per_block: int
    max_model_len: int  # the longest sequence: the config's or the model's, within what the KV cache holds
    sliding_window: int | None = None  # the model's attention window: the scheduler frees blocks behind it


@dataclasses.dataclass(frozen=True)
class EngineParts:
    """What an ``EngineCore`` runs with, loaded, sized and allocated by ``engine.native.builder``."""

    model_path: str  # as the config gave it (a folder, .gguf or tiny: URI), for EngineInfo
    architecture: str
    vocab_size: int
    runner: ModelRunner  # the model, its paged KV cache and the sampler
    admission: Admission  # the tokenizer, end-of-text ids and thinking markers
    limits: EngineLimits
    broadcaster: StepBroadcaster | None = None  # rank 0 of an expert-parallel group: sends each step to ranks 1..


@dataclasses.dataclass
class _Stages:
    """When a running request reached each stage (wall clock), for its ``RequestTimings``."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None


class EngineCore:
    """Built by ``engine.native.builder.build_engine_core``; takes its parts as they are (no I/O here)."""

    def __init__(self, config: EngineConfig, parts: EngineParts):
        self.config = config
        self.model_path, self.architecture, self.vocab_size = parts.model_path, parts.architecture, parts.vocab_size
        self.runner, self.admission, self.limits = parts.runner, parts.admission, parts.limits
        self.model = parts.runner.model
        self.max_model_len = parts.limits.max_model_len
        self.scheduler = Scheduler(
            config.scheduler,
            config.cache,
            parts.limits.num_blocks,
            max_model_len=parts.limits.max_model_len,
            sliding_window=parts.limits.sliding_window,
        )
        self.tokenizer: Tokenizer | None = parts.admission.tokenizer
        self.markers = parts.admission.markers
        self.requests: dict[str, Request] = {}
        self.states: dict[str, RequestState] = {}
        self.stages: dict[str, _Stages] = {}
        self._num_generated = 0
        self._num_prompt = 0
        self.broadcaster = parts.broadcaster

    @property
    def device(self) -> torch.device:
        """Where the weights, the KV cache and every step tensor live."""
        return self.runner.device

    # ---- admission -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        resume: Resume | None = None,
        arrival: float | None = None,
    ) -> list[int]:
        """Admit a request, and return its prompt's token ids; with ``resume``, one whose first outputs another
        engine produced.

        A resumed request is a request preempted by recompute: its prompt is
        encoded as usual, the resumed tokens are its first outputs (they count
        towards ``max_tokens``), its first step prefills both, and a seeded
        request draws its next token from the same generator as the
        uninterrupted run. Its output state replays those tokens silently.
        Resumed tokens that already end the request (a stop token, EOS, a stop
        string) are refused as ``resume.token_ids`` "already finished": the
        previous engine just did not get to report the end.

        ``arrival`` (``time.time()``, default now) is when the caller handed it
        over, for the queueing time in its ``RequestTimings``.
        """
        params = params or SamplingParams()
        if request_id in self.requests:
            raise EngineError("request_id", f"{request_id!r} is already running")
        admitted = self.admission.admit(request_id, prompt, params, resume)
        try:
            req = Request(request_id, admitted.prompt_ids, admitted.params, eos_token_id=self.admission.eos_id)
            if resume is not None:
                req.append_output_token_ids(resume.token_ids)
            self.scheduler.add_request(req)
        except ValueError as e:
            raise EngineError.from_value_error(e) from None
        self.requests[request_id], self.states[request_id] = req, admitted.state
        self.stages[request_id] = _Stages(time.time() if arrival is None else arrival)
        self._num_prompt += len(admitted.prompt_ids)
        return admitted.prompt_ids

    def abort_request(self, request_id: str) -> RequestDelta | None:
        """End a request now and free its blocks: its final delta (finish reason ``abort``), None if unknown."""
        if request_id not in self.requests:
            return None
        self.scheduler.abort_requests([request_id])
        return self._finish(request_id, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """One step: every request that got new tokens, or ended, has its delta here (the last one finished)."""
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return []
        began = time.time()
        for s in sched.seqs:
            stages = self.stages[s.request_id]
            if stages.first_scheduled is None:
                stages.first_scheduled = began
        result = self.runner.execute(sched, self.requests, self._sample_rows(sched))
        return self._prefill_progress(sched) + self._update(sched, result)

    def _prefill_progress(self, sched: SchedulerOutput) -> list[RequestDelta]:
        """A tokenless delta for each prefill chunk that did not reach the prompt's end: a long prompt's
        stream shows it is moving (and how far) before its first token."""
        out = []
        for s in sched.seqs:
            req = self.requests.get(s.request_id)
            if req is not None and not s.samples:
                out.append(
                    RequestDelta(
                        s.request_id, [], prompt_tokens_done=req.num_computed_tokens, prompt_tokens_total=req.num_tokens
                    )
                )
        return out

    def _sample_rows(self, sched: SchedulerOutput) -> dict[str, SampleRow]:
        rows = {}
        for s in sched.seqs:
            if s.samples:
                req = self.requests[s.request_id]
                state = self.states[s.request_id]
                rows[s.request_id] = SampleRow(
                    req.sampling_params,
                    req.num_output_tokens,
                    state.reasoning.banned_token_ids(),
                    state.next_token_bitmask(self.vocab_size),
                )
        return rows

    def _update(self, sched: SchedulerOutput, result: StepResult) -> list[RequestDelta]:
        emitted = [self.states[r].reasoning.next_token(t) for r, t in zip(result.request_ids, result.sampled)]
        logprobs = self._logprobs(result, emitted)
        for rid, lps in result.prompt_logprobs.items():
            state = self.states[rid]
            state.prompt_logprobs = (state.prompt_logprobs or [None]) + lps  # first prompt token has none
        deltas: list[RequestDelta] = []
        now = time.time()
        for out in self.scheduler.update(sched, {r: [t] for r, t in zip(result.request_ids, emitted)}):
            state = self.states[out.request_id]
            self._num_generated += len(out.new_token_ids)
            stages = self.stages[out.request_id]
            if stages.first_token is None and out.new_token_ids:
                stages.first_token = now
            delta = state.add_tokens(out.new_token_ids, logprobs.get(out.request_id))
            if (state.stopped_by_string or state.grammar_terminated) and out.finish_reason is None:
                # a stop string, or a constrained answer that is complete: nothing more may follow. A token
                # the grammar refused (the mask should make that impossible) is never passed off as "stop".
                refused = state.constraint is not None and state.constraint.refused is not None
                status = RequestStatus.FINISHED_ABORTED if refused else RequestStatus.FINISHED_STOPPED
                self.scheduler.finish_requests([out.request_id], status)
                out.finish_reason = "abort" if refused else "stop"
            if out.finish_reason is None:
                deltas.append(delta)
            else:
                if state.stop_reason is None:
                    state.stop_reason = out.stop_reason
                deltas.append(merge_final(delta, self._finish(out.request_id, out.finish_reason)))
        return deltas

    def _logprobs(self, result: StepResult, emitted: list[int]) -> dict[str, list[TokenLogprob]]:
        want = [i for i, r in enumerate(result.request_ids) if self.requests[r].sampling_params.logprobs is not None]
        if not want:
            return {}
        k = max(self.requests[result.request_ids[i]].sampling_params.logprobs or 0 for i in want)
        chosen, tops = logprobs_of(
            result.logits[want], torch.tensor([emitted[i] for i in want], device=result.logits.device), k
        )
        out = {}
        for j, i in enumerate(want):
            rid = result.request_ids[i]
            n = self.requests[rid].sampling_params.logprobs or 0
            out[rid] = [TokenLogprob(emitted[i], chosen[j], dict(list(tops[j].items())[:n]))]
        return out

    def _finish(self, request_id: str, reason: str) -> RequestDelta:
        req, state, stages = self.requests.pop(request_id), self.states.pop(request_id), self.stages.pop(request_id)
        # usage counts cached prompt tokens; a resumed request's hits may also cover its resumed outputs
        cached = min(max(req.num_cached_tokens, 0), req.num_prompt_tokens)
        delta = state.finish(reason, cached_tokens=cached)
        delta.timings = RequestTimings(
            stages.arrival, stages.first_scheduled, stages.first_token, time.time(), req.num_preemptions
        )
        return delta

    # ---- expert-parallel group -------------------------------------------------------------------

    def keepalive(self) -> None:
        """Call while idle: ranks 1.. wait at most ``timeout_s`` for rank 0's next message."""
        if self.broadcaster is not None:
            self.broadcaster.keepalive()

    def close(self, peers_ok: bool = True) -> None:
        """Stop ranks 1.. (when they can still hear it) and leave the group."""
        if self.broadcaster is None:
            return
        broadcaster, self.broadcaster = self.broadcaster, None
        self.runner.step_sink = None
        try:
            if peers_ok:
                broadcaster.stop()
        finally:
            broadcaster.group.close()

    # ---- introspection ---------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.model_path,
            architecture=self.architecture,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            ep_size=self.config.parallel.ep_size,
            ep_rank=self.config.parallel.ep_rank,
            num_local_expert_params=self.model.num_local_expert_params(),
            num_expert_params=self.model.num_expert_params(),
        )

    def stats(self) -> EngineStats:
        s = self.scheduler.get_stats()
        usable = self.runner.num_blocks - 1
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_preemptions=s.num_preemptions_total,
            block_size=self.config.cache.block_size,
            num_blocks=usable,
            num_used_blocks=s.num_used_blocks,
            kv_cache_bytes=self.runner.num_blocks * self.limits.kv_bytes_per_block,
            kv_bytes_per_block=self.limits.kv_bytes_per_block,
            kv_used_bytes=s.num_used_blocks * self.limits.kv_bytes_per_block,
            kv_cache_usage=s.kv_usage,
            prefix_cache_hit_rate=s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            num_generated_tokens=self._num_generated,
            num_prompt_tokens=self._num_prompt,
            prefix_cache_queried_tokens=s.prefix_cache_queries,
            prefix_cache_hit_tokens=s.prefix_cache_hits,
            expert_load=self.model.expert_load(),
        )
