"""The synchronous engine: admit requests, then step = schedule, execute, update.

``EngineCore`` is single-threaded; ``LLM`` drives it in a loop and
``AsyncEngine`` drives it from a background thread. With
``parallel.ep_size > 1`` it is rank 0 of an expert-parallel group: its runner
broadcasts every step to ranks 1.. (``engine.parallel``), and whoever drives
it calls ``keepalive()`` while idle and ``close()`` at the end.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from engine.api import (EngineError, EngineInfo, EngineStats, RequestDelta, RequestOutput, RequestTimings, Resume,
                        TokenLogprob)
from engine.config import EngineConfig
from engine.core.request import Request, RequestStatus, SamplingParams
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.device import engine_device
from engine.models.loader import default_model_path, load_model, resolve_model_dir
from engine.models.uris import resolve_tokenizer_path
from engine.output import RequestState
from engine.reasoning import ReasoningState, check_effort, resolve_markers
from engine.runner import ModelRunner, StepResult
from engine.sampler import SampleRow, logprobs_of
from engine.tokenizer import Tokenizer, find_tokenizer, load_tokenizer

Prompt = str | list[int] | list[dict[str, Any]]


@dataclasses.dataclass
class _Stages:
    """When a running request reached each stage (wall clock), for its ``RequestTimings``."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None


class EngineCore:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.device = engine_device(config.model.device)  # before anything is read: an unseen GPU fails fast
        if config.model.num_threads:
            torch.set_num_threads(config.model.num_threads)
        self.model_path = config.model.model or default_model_path()  # as given (a folder, .gguf or tiny: URI)
        model_dir = resolve_model_dir(self.model_path)
        self.model, hf_config = load_model(model_dir, config.model, config.parallel)
        self.architecture = (hf_config.get("architectures") or [type(self.model).__name__])[0]
        # an explicit tokenizer must exist; the model's own may be absent (tiny test checkpoints)
        self.tokenizer: Tokenizer | None = (load_tokenizer(resolve_tokenizer_path(config.model.tokenizer))
                                            if config.model.tokenizer else find_tokenizer(model_dir))
        self.vocab_size = int(hf_config["vocab_size"])
        self.eos_ids = self._eos_ids(hf_config)

        block_size = config.cache.block_size
        spec = self.model.kv_cache_spec()
        self.kv_bytes_per_block = spec.bytes_per_block(block_size)
        # +1: block 0 is the null block that pads block tables
        num_blocks = config.cache.num_blocks or config.cache.kv_cache_memory_bytes // self.kv_bytes_per_block + 1
        model_limit = hf_config.get("max_position_embeddings")
        wanted = config.model.max_model_len or model_limit or 32768
        sched_cfg = dataclasses.replace(config.scheduler, max_model_len=min(wanted, model_limit) if model_limit else wanted)
        self.scheduler = Scheduler(sched_cfg, config.cache, num_blocks)
        self.max_model_len = self.scheduler.max_model_len  # also capped when the cache cannot hold a full-length sequence
        self.runner = ModelRunner(self.model, num_blocks, block_size)
        self.markers = resolve_markers(self.tokenizer, config.reasoning)
        self.requests: dict[str, Request] = {}
        self.states: dict[str, RequestState] = {}
        self.finished: dict[str, RequestOutput] = {}
        self.stages: dict[str, _Stages] = {}
        self._num_generated = 0
        self._num_prompt = 0
        self.broadcaster = None  # rank 0 of an expert-parallel group: sends each step to ranks 1..
        if config.parallel.ep_size > 1:  # last: join the group only once everything local has worked
            from engine.parallel.driver import start_driver
            from engine.parallel.wire import Hello

            self.broadcaster = start_driver(self.model, config.parallel, Hello(
                num_blocks, block_size, self.max_model_len, self.vocab_size, self.model.num_expert_params()))
            self.runner.step_sink = self.broadcaster

    # ---- admission -------------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt, effort: str) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise EngineError("prompt", "must not be empty")
            return self._need_tokenizer().encode(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            tokenizer = self._need_tokenizer()
            try:
                return tokenizer.apply_chat_template(list(prompt), reasoning_effort=effort)  # type: ignore[arg-type]
            except ValueError:
                raise
            except Exception as e:  # a template that rejects the conversation (order of roles...): the caller's input
                raise EngineError("messages", f"the chat template rejected them: {type(e).__name__}: {e}") from None
        ids = list(prompt)  # type: ignore[arg-type]
        if not ids:
            raise EngineError("prompt", "must not be empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise EngineError("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        return ids

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    resume: Resume | None = None, arrival: float | None = None) -> None:
        """Admit a request; with ``resume``, one whose first outputs another engine produced.

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
        effort = params.reasoning_effort or self.config.reasoning.default_effort
        try:
            check_effort(effort)
        except ValueError as e:
            raise EngineError.from_value_error(e) from None
        ids = self.encode_prompt(prompt, effort)
        if len(ids) >= self.max_model_len:
            raise EngineError("prompt", f"{len(ids)} tokens does not fit max_model_len {self.max_model_len}")
        extra_stops = tuple(t for t in self.eos_ids[1:] if t not in params.stop_token_ids)
        if extra_stops and not params.ignore_eos:
            params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra_stops)
        if resume is not None:
            self._check_resume(resume, params, len(ids))
        budget = params.thinking_budget or self.config.reasoning.budget(effort)
        try:
            req = Request(request_id, ids, params, eos_token_id=self.eos_ids[0] if self.eos_ids else None)
            state = RequestState(request_id, ids, params, ReasoningState(self.markers, effort, budget, ids, frozenset(self.eos_ids)), self.tokenizer)
            if resume is not None:
                state.replay(resume.token_ids, resume.text_chars, resume.reasoning_chars)
                req.append_output_token_ids(resume.token_ids)
            self.scheduler.add_request(req)
        except ValueError as e:
            raise EngineError.from_value_error(e) from None
        self.requests[request_id], self.states[request_id] = req, state
        self.stages[request_id] = _Stages(time.time() if arrival is None else arrival)
        self._num_prompt += len(ids)

    def _check_resume(self, resume: Resume, params: SamplingParams, num_prompt: int) -> None:
        """What a resume must satisfy beyond its own fields, before any state is built."""
        k = len(resume.token_ids)
        if params.prompt_logprobs is not None:
            # the previous engine sent them with its first delta; this engine's prefill would send them again
            raise EngineError("resume", "cannot be combined with prompt_logprobs")
        if k >= params.max_tokens:
            raise EngineError("resume.token_ids",
                              f"{k} tokens leave nothing to generate under max_tokens {params.max_tokens}")
        if num_prompt + k >= self.max_model_len:
            raise EngineError("resume.token_ids", f"{num_prompt} prompt + {k} resumed tokens leave nothing to "
                                                  f"generate under max_model_len {self.max_model_len}")
        bad = next((i for i, t in enumerate(resume.token_ids) if t >= self.vocab_size), None)
        if bad is not None:
            raise EngineError("resume.token_ids", f"{resume.token_ids[bad]} at index {bad} is not below "
                                                  f"the vocab size {self.vocab_size}")
        end = next((i for i, t in enumerate(resume.token_ids) if self._ends_request(t, params)), None)
        if end is not None:
            raise EngineError("resume.token_ids", f"already finished: token {resume.token_ids[end]} at index {end} "
                                                  f"is a stop token")

    def _ends_request(self, token: int, params: SamplingParams) -> bool:
        """The scheduler's stop-token rule (``params`` with the extra EOS ids already among its stop tokens)."""
        eos = self.eos_ids[0] if self.eos_ids else None
        return (token == eos and not params.ignore_eos) or token in params.stop_token_ids

    def abort_request(self, request_id: str) -> RequestDelta | None:
        if request_id not in self.requests:
            return None
        self.scheduler.abort_requests([request_id])
        return self._finish(request_id, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return []
        began = time.time()
        for s in sched.seqs:
            stages = self.stages[s.request_id]
            if stages.first_scheduled is None:
                stages.first_scheduled = began
        result = self.runner.execute(sched, self.requests, self._sample_rows(sched))
        return self._update(sched, result)

    def _sample_rows(self, sched: SchedulerOutput) -> dict[str, SampleRow]:
        rows = {}
        for s in sched.seqs:
            if s.samples:
                req = self.requests[s.request_id]
                banned = self.states[s.request_id].reasoning.banned_token_ids()
                rows[s.request_id] = SampleRow(req.sampling_params, req.num_output_tokens, banned)
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
            if state.stopped_by_string and out.finish_reason is None:
                self.scheduler.finish_requests([out.request_id], RequestStatus.FINISHED_STOPPED)
                out.finish_reason = "stop"
            if out.finish_reason is None:
                deltas.append(delta)
            else:
                if state.stop_reason is None:
                    state.stop_reason = out.stop_reason
                deltas.append(self._merge(delta, self._finish(out.request_id, out.finish_reason)))
        return deltas

    def _logprobs(self, result: StepResult, emitted: list[int]) -> dict[str, list[TokenLogprob]]:
        want = [i for i, r in enumerate(result.request_ids) if self.requests[r].sampling_params.logprobs is not None]
        if not want:
            return {}
        k = max(self.requests[result.request_ids[i]].sampling_params.logprobs or 0 for i in want)
        chosen, tops = logprobs_of(result.logits[want], torch.tensor([emitted[i] for i in want],
                                                                     device=result.logits.device), k)
        out = {}
        for j, i in enumerate(want):
            rid = result.request_ids[i]
            n = self.requests[rid].sampling_params.logprobs or 0
            out[rid] = [TokenLogprob(emitted[i], chosen[j], dict(list(tops[j].items())[:n]))]
        return out

    @staticmethod
    def _merge(a: RequestDelta, b: RequestDelta) -> RequestDelta:
        b.token_ids = a.token_ids + b.token_ids
        b.text, b.reasoning_text = a.text + b.text, a.reasoning_text + b.reasoning_text
        b.logprobs = (a.logprobs or []) + (b.logprobs or []) if (a.logprobs or b.logprobs) else None
        return b

    def _finish(self, request_id: str, reason: str) -> RequestDelta:
        req, state, stages = self.requests.pop(request_id), self.states.pop(request_id), self.stages.pop(request_id)
        # usage counts cached prompt tokens; a resumed request's hits may also cover its resumed outputs
        cached = min(max(req.num_cached_tokens, 0), req.num_prompt_tokens)
        delta = state.finish(reason, cached_tokens=cached)
        delta.timings = RequestTimings(stages.arrival, stages.first_scheduled, stages.first_token, time.time(),
                                       req.num_preemptions)
        self.finished[request_id] = dataclasses.replace(state.to_output(reason), timings=delta.timings)
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
            model=self.model_path, architecture=self.architecture, max_model_len=self.max_model_len,
            vocab_size=self.vocab_size, ep_size=self.config.parallel.ep_size, ep_rank=self.config.parallel.ep_rank,
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
            kv_cache_bytes=self.runner.num_blocks * self.kv_bytes_per_block,
            kv_bytes_per_block=self.kv_bytes_per_block,
            kv_used_bytes=s.num_used_blocks * self.kv_bytes_per_block,
            kv_cache_usage=s.kv_usage,
            prefix_cache_hit_rate=s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            num_generated_tokens=self._num_generated,
            num_prompt_tokens=self._num_prompt,
            prefix_cache_queried_tokens=s.prefix_cache_queries,
            prefix_cache_hit_tokens=s.prefix_cache_hits,
            expert_load=self.model.expert_load(),
        )

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise EngineError("prompt", "this model has no tokenizer; send token ids")
        return self.tokenizer

    def _eos_ids(self, hf_config: dict) -> list[int]:
        eos = hf_config.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids = [self.tokenizer.eos_token_id] + ids
        return [int(i) for i in ids]
