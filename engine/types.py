"""The engine's vocabulary: what crosses its boundary, whichever engine serves.

``EngineClient`` is the whole contract between the serving cluster and an
engine (in-process, in a Ray actor, or a fake in tests): submit, stream,
abort, stats, health. Everything crossing it is a plain dataclass defined
here, with ``SamplingParams`` (from ``engine.core``) and the ``Prompt`` forms.
Torch-free; how an engine is built is ``engine.api``'s business.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.core.request import SamplingParams, StructuredOutput, ToolSpec

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineInfo",
    "EngineStats",
    "Message",
    "Prompt",
    "RequestDelta",
    "RequestOutput",
    "RequestTimings",
    "Resume",
    "SamplingParams",
    "StructuredOutput",
    "TokenLogprob",
    "ToolCallDelta",
    "ToolSpec",
    "Usage",
    "merge_tool_calls",
]

Message = dict[str, Any]
Prompt = str | list[int] | list[Message]  # text, token ids or chat messages


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass(frozen=True)
class Resume:
    """Continue a request whose first outputs were produced elsewhere (same prompt, params and seed).

    The engine takes ``token_ids`` as if it had generated them itself (a
    seeded request then draws the same next tokens as the uninterrupted run)
    and streams only what the client has not received: no token of
    ``token_ids`` again, answer text from character ``text_chars`` on and
    reasoning text from character ``reasoning_chars`` on (characters as in a
    Python ``str``). The counts may be below what those tokens decode to:
    the previous server holds back a tail that could still become a stop
    string, or an incomplete UTF-8 character, and that tail comes now.
    ``max_tokens`` and the final usage count the resumed tokens; logprobs, if
    asked for, come for the new tokens only. Tokens that already end the
    request are refused (``EngineError`` on ``resume.token_ids``).
    """

    token_ids: tuple[int, ...]  # every output token already delivered, in order (reasoning markers included)
    text_chars: int = 0  # answer characters already delivered to the client
    reasoning_chars: int = 0  # reasoning characters already delivered

    def __post_init__(self) -> None:
        # Callers (JSON, protobuf) hand us lists; freeze them like SamplingParams does.
        if not isinstance(self.token_ids, Sequence) or isinstance(self.token_ids, (str, bytes)):
            raise ValueError(f"resume.token_ids: must be a list of token ids, got {type(self.token_ids).__name__}")
        ids = tuple(self.token_ids)
        if not ids:
            raise ValueError("resume.token_ids: must not be empty (a request with no outputs yet needs no resume)")
        bad = next((i for i, t in enumerate(ids) if not _is_count(t)), None)
        if bad is not None:
            raise ValueError(f"resume.token_ids: must be token ids >= 0, got {ids[bad]!r} at index {bad}")
        object.__setattr__(self, "token_ids", ids)
        for name in ("text_chars", "reasoning_chars"):
            if not _is_count(getattr(self, name)):
                raise ValueError(f"resume.{name}: must be an int >= 0, got {getattr(self, name)!r}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # the top-k alternatives, by token id


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the model's ``index``-th tool call: its id and name come once, first; arguments in pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # the next piece of the arguments' JSON text


def merge_tool_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCallDelta]:
    """Tool-call deltas added up: one per call, in order of index, with its id, name and whole arguments."""
    calls: dict[int, ToolCallDelta] = {}
    for d in deltas:
        seen = calls.get(d.index)
        calls[d.index] = d if seen is None else dataclasses.replace(seen, arguments=seen.arguments + d.arguments)
    return [calls[i] for i in sorted(calls)]


@dataclass(frozen=True)
class RequestTimings:
    """When one request went through the engine's stages: wall-clock ``time.time()`` seconds.

    Queueing is ``arrival`` to ``first_scheduled``, prefill from there to
    ``first_token``, decode from there to ``finished``. A stage the request never
    reached is None (aborted while waiting, say). A preempted request is
    recomputed inside these spans; ``num_preemptions`` says how often.
    """

    arrival: float  # submitted to the engine
    first_scheduled: float | None  # first step that computed any of its tokens
    first_token: float | None  # first output token this engine produced
    finished: float
    num_preemptions: int = 0


@dataclass
class RequestDelta:
    """One streamed piece of a request: new tokens, split into reasoning and answer text."""

    request_id: str
    token_ids: list[int]
    text: str = ""  # new answer text
    reasoning_text: str = ""  # new text inside the thinking span
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" (set when finished)
    usage: Usage | None = None  # set when finished
    timings: RequestTimings | None = None  # set when finished by the engine's own step loop
    # Set when finished, so a request's deltas add up to its whole RequestOutput:
    stop_reason: int | str | None = None  # the stop token id or string that ended it (None for eos)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # if asked for; the first prompt token has none
    # A prefill chunk that did not finish the prompt: no tokens, and how far prefill got (tokens in the
    # KV cache, of ``prompt_tokens_total``). None: not a progress report.
    prompt_tokens_done: int | None = None
    prompt_tokens_total: int | None = None
    tool_calls: list[ToolCallDelta] | None = None  # with tools: the calls parsed from the new tokens


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    reasoning_effort: str


@dataclass
class RequestOutput:
    """A finished request, as ``LLM.generate`` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    reasoning_text: str
    finish_reason: str | None
    stop_reason: int | str | None
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    timings: RequestTimings | None = None
    tool_calls: list[ToolCallDelta] | None = None  # the calls it made, each whole (its deltas added up)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    block_size: int
    num_blocks: int  # usable blocks (the null block excluded)
    num_used_blocks: int
    kv_cache_bytes: int  # memory of the whole paged cache
    kv_bytes_per_block: int
    kv_used_bytes: int
    kv_cache_usage: float  # used / usable blocks
    prefix_cache_hit_rate: float  # hit tokens / queried tokens since start
    num_generated_tokens: int
    num_prompt_tokens: int
    prefix_cache_queried_tokens: int = 0  # since start; with the next, a hit rate over any window
    prefix_cache_hit_tokens: int = 0
    # Token-to-expert assignments routed to each expert-parallel rank's slice of the experts, summed
    # over MoE layers since start (rank r first holds experts [r*E/n, (r+1)*E/n)); () without experts.
    expert_load: tuple[int, ...] = ()


@dataclass
class EngineInfo:
    """What a served model is, for ``ListModels`` and capacity checks."""

    model: str  # the checkpoint path or name it was loaded from
    architecture: str  # e.g. "Mistral4ForCausalLM"
    max_model_len: int
    vocab_size: int
    ep_size: int = 1
    ep_rank: int = 0
    num_local_expert_params: int = 0  # routed-expert parameters this rank holds
    num_expert_params: int = 0  # routed-expert parameters of the whole model


class EngineError(Exception):
    """A request the engine cannot take; ``field`` names the offending input."""

    def __init__(self, field: str, message: str, kind: str = "invalid_argument"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.kind = kind  # "invalid_argument" | "resource_exhausted" | "unavailable"

    @classmethod
    def from_value_error(cls, e: ValueError) -> EngineError:
        """Our configs and params raise ``ValueError("field: message")``; keep the field."""
        field, _, message = str(e).partition(": ")
        return cls(field, message) if message else cls("request", field)


class EngineClient(ABC):
    """Submit, stream, abort, stats, health: the cluster sees nothing else."""

    async def _check_can_take(self, request_id: str, running: Container[str], error: BaseException | None) -> None:
        """What every engine refuses before admitting: a request while not serving, a request id twice."""
        if not await self.health():
            raise EngineError("engine", f"not serving: {error!r}", kind="unavailable")
        if request_id in running:
            raise EngineError("request_id", f"{request_id!r} is already running")

    @abstractmethod
    async def submit(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> None:
        """Admit a request (text, token ids or chat messages). Raises EngineError on bad input.

        With ``resume``, continue a request another engine started: see ``Resume``.
        """

    @abstractmethod
    def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        """Deltas of a submitted request until its final one (``finished=True``)."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at once; unknown ids are ignored."""

    @abstractmethod
    async def stats(self) -> EngineStats: ...

    @abstractmethod
    async def health(self) -> bool: ...

    @abstractmethod
    async def info(self) -> EngineInfo: ...

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine and release what it holds; in-flight streams end with ``abort``."""

    async def generate(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Submit and stream in one call; aborts the request if the consumer stops early."""
        # resume only when given: clients written before it existed keep working for plain requests
        await (
            self.submit(request_id, prompt, params, resume=resume)
            if resume is not None
            else self.submit(request_id, prompt, params)
        )
        finished = False
        try:
            async for delta in self.stream(request_id):
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                await self.abort(request_id)
