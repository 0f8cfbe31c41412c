"""A generation request and its sampling parameters, as the scheduler sees them.

Torch-free: the core only moves token ids around; tensors live in the runner.
"""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.config import EFFORTS


def _check(cond: bool, name: str, msg: str) -> None:
    # Same convention as engine.config: the message starts with the field name
    # so an API layer can map it back to the offending request field.
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# A temperature this low is greedy: dividing logits by less overflows float32 (inf - inf = NaN, and the
# argmax over NaN picks token 0). vLLM draws the same line (its _SAMPLING_EPS).
MIN_TEMPERATURE = 1e-5


def _first_bad(values: tuple, ok: Callable[[object], bool]) -> str:
    """``", got v at index i"`` for the first value ``ok`` refuses, or "": errors name one value, never all."""
    for i, v in enumerate(values):
        if not ok(v):
            return f", got {(v[:40] if isinstance(v, str) else v)!r} at index {i}"  # a few dozen characters at most
    return ""


STRUCTURED_KINDS = ("json_object", "json_schema")
TOOL_CHOICES = ("auto", "none", "required")  # or the name of one of the request's tools


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain the output to JSON: any object, or one that a JSON Schema accepts."""

    kind: str  # one of STRUCTURED_KINDS
    schema: str | None = None  # the JSON Schema as JSON text (kind "json_schema")
    name: str = ""  # the schema's name, as OpenAI's json_schema.name
    strict: bool = True

    @classmethod
    def from_openai(cls, response_format: dict) -> StructuredOutput | None:
        """OpenAI's ``response_format`` object: ``{"type": "json_schema", "json_schema": {"name", "schema",
        "strict"}}``, ``{"type": "json_object"}``, or ``{"type": "text"}`` (None: unconstrained)."""
        _check(isinstance(response_format, dict), "response_format", "must be an object")
        kind = response_format.get("type")
        _check(
            kind in ("text", *STRUCTURED_KINDS),
            "response_format.type",
            f"must be text, {' or '.join(STRUCTURED_KINDS)}",
        )
        if kind == "text":
            return None
        if kind != "json_schema":
            return cls(kind, strict=False)  # OpenAI's default; a json_object has no schema to be strict about
        spec = response_format.get("json_schema")
        _check(isinstance(spec, dict), "response_format.json_schema", "must be an object with a schema")
        schema, name = spec.get("schema", {}), spec.get("name", "")
        _check(isinstance(schema, dict), "response_format.json_schema.schema", "must be a JSON Schema object")
        _check(isinstance(name, str), "response_format.json_schema.name", "must be a string")
        return cls(kind, json.dumps(schema), name, bool(spec.get("strict") or False))

    def __post_init__(self) -> None:
        _check(self.kind in STRUCTURED_KINDS, "response_format.type", f"must be one of {STRUCTURED_KINDS}")
        _check(
            (self.schema is not None) == (self.kind == "json_schema"),
            "response_format.json_schema",
            "a schema comes with kind json_schema, and only with it",
        )


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call."""

    name: str
    description: str = ""
    parameters: str = "{}"  # its arguments' JSON Schema, as JSON text

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), "tools.name", "must be a non-empty string")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Checked on construction."""

    max_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None  # per-request generator; None: the engine's
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per sampled token
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token
    reasoning_effort: str | None = None  # one of EFFORTS; None: engine default
    thinking_budget: int | None = None  # overrides the effort's budget; either is capped at max_tokens // 2
    # Prefix-cache namespace: a request reuses cached KV blocks only of requests with the same salt
    # (a serving layer sets it per tenant, so hits never tell one tenant what another sent). None: unsalted.
    cache_salt: str | None = None
    structured: StructuredOutput | None = None  # None: unconstrained
    tools: tuple[ToolSpec, ...] = ()  # rendered into the chat prompt; their calls come back parsed
    tool_choice: str | None = None  # one of TOOL_CHOICES or a tool's name; None: "auto" with tools

    def __post_init__(self) -> None:
        # Callers (JSON APIs) hand us lists; freeze them so the params stay
        # hashable and cannot change under a running request. A bare string is
        # one stop string, not a sequence of one-character stops.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "tools", tuple(self.tools))
        self._validate()
        if self.temperature < MIN_TEMPERATURE:  # every engine and sampler then takes the greedy path
            object.__setattr__(self, "temperature", 0.0)

    def _validate(self) -> None:
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens!r}"
        )
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be >= 0, got {self.temperature!r}",
        )
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be >= 0 (0 disables), got {self.top_k!r}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(self.seed is None or _is_int(self.seed), "seed", f"must be an int or None, got {self.seed!r}")
        bad = _first_bad(self.stop, lambda s: isinstance(s, str) and bool(s))
        _check(not bad, "stop", f"must be non-empty strings{bad}")
        bad = _first_bad(self.stop_token_ids, lambda t: _is_int(t) and t >= 0)
        _check(not bad, "stop_token_ids", f"must be token ids >= 0{bad}")
        for name in ("logprobs", "prompt_logprobs", "thinking_budget"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v >= 0), name, f"must be >= 0 or None, got {v!r}")
        _check(
            self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt != ""),
            "cache_salt",
            f"must be a non-empty string or None, got {self.cache_salt!r:.40}",
        )
        _check(
            self.reasoning_effort is None or self.reasoning_effort in EFFORTS,
            "reasoning_effort",
            f"must be one of {EFFORTS} or None, got {self.reasoning_effort!r}",
        )
        self._validate_tools()

    def _validate_tools(self) -> None:
        names = [t.name for t in self.tools]
        _check(len(set(names)) == len(names), "tools", "function names must be unique")
        choice = self.tool_choice
        _check(
            choice is None or choice in TOOL_CHOICES or choice in names,
            "tool_choice",
            f"must be one of {TOOL_CHOICES} or the name of a tool, got {choice!r:.60}",
        )
        _check(choice in (None, "none", "auto") or bool(self.tools), "tool_choice", f"{choice!r:.60} needs tools")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # back in the waiting queue, KV freed, will recompute
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()


_FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


def is_finished(status: RequestStatus) -> bool:
    return status in _FINISH_REASONS


def finish_reason(status: RequestStatus) -> str | None:
    """OpenAI-style reason: "stop" | "length" | "abort", or None while unfinished."""
    return _FINISH_REASONS.get(status)


class Request:
    """One sequence. The scheduler's single rule: ``num_computed_tokens``
    catches up with ``num_tokens``; prefill, decode and recompute after a
    preemption are all that rule.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: SamplingParams | None = None,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
    ) -> None:
        prompt = list(prompt_token_ids)
        _check(len(prompt) > 0, "prompt", "must not be empty")
        _check(all(_is_int(t) and t >= 0 for t in prompt), "prompt", "token ids must be ints >= 0")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = prompt
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        # prompt + output; appended in place so slices handed out stay cheap.
        self.all_token_ids: list[int] = list(prompt)
        # Tokens whose KV is (or is scheduled to be) in the cache.
        self.num_computed_tokens = 0
        # Prefix-cache hit tokens at first schedule; -1 until then.
        self.num_cached_tokens = -1
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # prompt_logprobs requests: prompt positions [0, this) already went out
        # in a chunk flagged wants_prompt_logprobs. A recompute after a
        # preemption must not flag them again (the engine appends per chunk).
        self.prompt_logprobs_pos = 0
        # Chained hashes of every full block of all_token_ids, filled lazily
        # by the KV cache manager (only new full blocks get hashed).
        self.block_hashes: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return is_finished(self.status)

    @property
    def finish_reason(self) -> str | None:
        return finish_reason(self.status)

    def append_output_token_ids(self, token_ids: int | Iterable[int]) -> None:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.output_token_ids.extend(ids)
        self.all_token_ids.extend(ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
