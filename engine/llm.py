"""``LLM``: the synchronous Python API, in the manner of vLLM's offline LLM class."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Sequence

from engine.config import EngineConfig, ModelConfig
from engine.core.request import SamplingParams
from engine.native.builder import build_engine_core
from engine.output import collect_output
from engine.types import EngineStats, Message, Prompt, RequestDelta, RequestOutput, Resume


class LLM:
    """Load a model and generate from it.

    >>> llm = LLM()                      # the embedded default model
    >>> out = llm.generate("What is the capital of France?", SamplingParams(temperature=0))
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        tokenizer: str | None = None,
        backend: str = "native",
        config: EngineConfig | None = None,
    ):
        if config is None:
            config = EngineConfig(
                backend=backend,
                model=ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len),
            )
        self.backend = config.backend
        self._vllm = None
        if config.backend == "vllm":  # vLLM steps in its own process; we admit and decode as the native engine does
            from engine.vllm.offline import OfflineVllm

            self._vllm = OfflineVllm(config)
        else:
            self.engine = build_engine_core(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self._vllm.engine.admission.tokenizer if self._vllm else self.engine.tokenizer

    def close(self) -> None:
        """Stop vLLM's engine process (the native engine holds nothing outside this process)."""
        if self._vllm is not None:
            self._vllm.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in prompt order."""
        prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: {len(plist)} given for {len(prompts)} prompts")
        if self._vllm is not None:
            return self._vllm.generate(prompts, plist)
        submitted = [(*self._submit(p, sp), sp) for p, sp in zip(prompts, plist)]
        deltas: dict[str, list[RequestDelta]] = {rid: [] for rid, _, _ in submitted}
        done = 0
        while self.engine.has_unfinished_requests():
            for d in self.engine.step():
                deltas.setdefault(d.request_id, []).append(d)
                if d.finished and progress:
                    done += 1
                    print(f"\r{done}/{len(submitted)} requests done", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return [collect_output(prompt_ids, sp, deltas[rid]) for rid, prompt_ids, sp in submitted]

    def chat(
        self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Like ``generate`` for one conversation or a list of them (the model's chat template applies)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate(list(convs), params)  # type: ignore[arg-type]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, resume: Resume | None = None
    ) -> Iterator[RequestDelta]:
        """Deltas of one request as they are produced; the request is aborted if the caller stops early.

        With ``resume``, continue a request another engine started (see ``Resume``).
        """
        if self._vllm is not None:
            yield from self._vllm.stream(prompt, params or SamplingParams(), resume)
            return
        rid, _ = self._submit(prompt, params or SamplingParams(), resume)
        try:
            while True:
                for d in self.engine.step():
                    if d.request_id == rid:
                        yield d
                        if d.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def stats(self) -> EngineStats:
        return self._vllm.stats() if self._vllm else self.engine.stats()

    def _submit(self, prompt: Prompt, params: SamplingParams, resume: Resume | None = None) -> tuple[str, list[int]]:
        """(request id, prompt token ids) of a newly admitted request."""
        rid = f"llm-{next(self._ids)}"
        return rid, self.engine.add_request(rid, prompt, params, resume)
