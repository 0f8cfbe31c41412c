"""What every backend does to a request before it runs: the same prompt, limits, stops and output state.

``Admission`` turns (prompt, params, resume) into the prompt's token ids, the
params the model runs with (the model's extra end-of-text ids added as stop
tokens) and the ``RequestState`` that splits reasoning from answer text,
detokenizes and checks stop strings. The native engine and the vLLM backend
both admit through it, so a request is refused, split and cut the same way
whichever engine serves it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.config import EngineConfig, ReasoningConfig
from engine.core.request import SamplingParams
from engine.core.stop import stop_token
from engine.output import RequestState
from engine.reasoning import ReasoningState, ThinkMarkers, check_effort, resolve_markers
from engine.structured import GrammarCompiler, GrammarMatcher, grammar_compiler
from engine.structured.answer import AnswerConstraint
from engine.tokenizer import Tokenizer, model_tokenizer
from engine.toolcalls import MARKERS, ToolCallParser, forced_call_schema, forced_choice, parses_calls
from engine.types import EngineError, Prompt, Resume, StructuredOutput


def eos_ids_of(hf_config: dict, tokenizer: Tokenizer | None) -> list[int]:
    """End-of-text ids: the tokenizer's first (the one ``ignore_eos`` lifts), then the config's."""
    eos = hf_config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id] + ids
    return [int(i) for i in ids]


def answer_room_budget(budget: int, max_tokens: int) -> int:
    """The thinking budget a request gets: at most half its ``max_tokens``, so an answer always has room.

    A budget as large as ``max_tokens`` would let the span eat every token
    and end the request at ``length`` with no answer at all.
    """
    return min(budget, max_tokens // 2)


def model_max_len(asked: int | None, hf_config: dict) -> int:
    """The longest sequence asked for, within the model's max_position_embeddings (32768 when neither says)."""
    limit = hf_config.get("max_position_embeddings")
    wanted = asked or limit or 32768
    return min(wanted, limit) if limit else wanted


@dataclass
class Admitted:
    prompt_ids: list[int]
    params: SamplingParams  # with the model's extra end-of-text ids among its stop tokens
    state: RequestState  # resumed tokens already replayed into it
    effort: str
    thinking_budget: int  # thinking tokens this request may spend (0 at effort none)


@dataclass
class Admission:
    tokenizer: Tokenizer | None
    vocab_size: int
    eos_ids: list[int]
    markers: ThinkMarkers
    reasoning: ReasoningConfig
    max_model_len: int
    _compiler: GrammarCompiler | None = field(default=None, init=False, repr=False)  # built on first use

    @classmethod
    def for_model(cls, config: EngineConfig, model_dir: str, hf_config: dict, max_model_len: int) -> Admission:
        """The model's tokenizer (refused if larger than its vocabulary), end-of-text ids and thinking markers."""
        vocab_size = int(hf_config["vocab_size"])
        tokenizer = model_tokenizer(config.model.tokenizer, model_dir, vocab_size)
        return cls(
            tokenizer,
            vocab_size,
            eos_ids_of(hf_config, tokenizer),
            resolve_markers(tokenizer, config.reasoning),
            config.reasoning,
            max_model_len,
        )

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def encode_prompt(self, prompt: Prompt, effort: str, params: SamplingParams | None = None) -> list[int]:
        tools = params.tools if params is not None else ()
        is_chat = bool(prompt) and all(isinstance(m, dict) for m in prompt)  # type: ignore[union-attr]
        if tools and not is_chat:
            raise EngineError("tools", "only a chat (messages) prompt can offer tools to the model")
        if isinstance(prompt, str):
            if not prompt:
                raise EngineError("prompt", "must not be empty")
            return self._need_tokenizer().encode(prompt)
        if is_chat:
            tokenizer = self._need_tokenizer()
            try:
                return tokenizer.apply_chat_template(list(prompt), reasoning_effort=effort, tools=tools)  # type: ignore[arg-type]
            except ValueError as e:  # ours and the tokenizer's: "field: message"
                raise EngineError.from_value_error(e) from None
            except Exception as e:  # noqa: BLE001 -- a template that rejects the conversation: the caller's input
                raise EngineError("messages", f"the chat template rejected them: {type(e).__name__}: {e}") from None
        ids = list(prompt)  # type: ignore[arg-type]
        if not ids:
            raise EngineError("prompt", "must not be empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise EngineError("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        return ids

    def admit(self, request_id: str, prompt: Prompt, params: SamplingParams, resume: Resume | None) -> Admitted:
        """Encode and check a request, and build its output state; EngineError names the bad field."""
        effort = params.reasoning_effort or self.reasoning.default_effort
        try:
            check_effort(effort)
        except ValueError as e:
            raise EngineError.from_value_error(e) from None
        ids = self.encode_prompt(prompt, effort, params)
        params = self._force_call(params)  # before anything reads params.structured
        if len(ids) >= self.max_model_len:
            raise EngineError("prompt", f"{len(ids)} tokens does not fit max_model_len {self.max_model_len}")
        extra_stops = tuple(t for t in self.eos_ids[1:] if t not in params.stop_token_ids)
        if extra_stops and not params.ignore_eos:
            params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra_stops)
        if resume is not None:
            self._check_resume(resume, params, len(ids))
        budget = answer_room_budget(params.thinking_budget or self.reasoning.budget(effort), params.max_tokens)
        grammar = self._grammar(params)
        try:
            reasoning = ReasoningState(self.markers, effort, budget, ids, frozenset(self.eos_ids))
            parser, marks = self._tool_parser(params)
            constraint = AnswerConstraint(grammar, reasoning) if grammar is not None else None
            state = RequestState(
                request_id,
                ids,
                params,
                reasoning,
                self.tokenizer,
                tool_parser=parser,
                tool_marks=marks,
                constraint=constraint,
            )
            if resume is not None:
                state.replay(resume.token_ids, resume.text_chars, resume.reasoning_chars)
        except ValueError as e:
            raise EngineError.from_value_error(e) from None
        return Admitted(ids, params, state, effort, reasoning.budget)

    @staticmethod
    def _force_call(params: SamplingParams) -> SamplingParams:
        """A forced call ("required" or a tool's name) constrains the output to a JSON list of calls."""
        if not forced_choice(params):
            return params
        if params.structured is not None:
            raise EngineError("tool_choice", f"{params.tool_choice!r:.60} cannot be combined with response_format")
        try:
            schema = forced_call_schema(params.tools, params.tool_choice or "")
        except ValueError as e:
            raise EngineError.from_value_error(e) from None
        return dataclasses.replace(
            params, structured=StructuredOutput("json_schema", schema, "tool_calls", strict=True)
        )

    def _tool_parser(self, params: SamplingParams) -> tuple[ToolCallParser | None, dict[int, str]]:
        """The request's tool-call parser, in the format its model writes (JSON for a forced call), and the ids
        of that format's control tokens."""
        if not parses_calls(params) or self.tokenizer is None:
            return None, {}
        forced = forced_choice(params)
        fmt = "json" if forced else self.tokenizer.tool_call_format or "json"
        marks = {self.tokenizer.special_token_id(m): m for m in MARKERS.get(fmt, ())}
        marks.pop(None, None)
        return ToolCallParser(fmt, [t.name for t in params.tools], forced=forced), marks  # type: ignore[return-value]

    def _grammar(self, params: SamplingParams) -> GrammarMatcher | None:
        """The request's matcher at the grammar's start; the compiler is built on the first such request
        (it reads the whole vocabulary: 0.5-1.5 s for 131072 tokens, docs/benchmarks.md)."""
        if params.structured is None:
            return None
        if self.tokenizer is None:
            raise EngineError("response_format", "this model has no tokenizer, which a grammar needs")
        if self._compiler is None:
            try:
                self._compiler = grammar_compiler(self.tokenizer, self.vocab_size, self.eos_ids)
            except ValueError as e:
                raise EngineError.from_value_error(e) from None
        return self._compiler.matcher(params.structured)

    def _check_resume(self, resume: Resume, params: SamplingParams, num_prompt: int) -> None:
        """What a resume must satisfy beyond its own fields, before any state is built."""
        k = len(resume.token_ids)
        if params.prompt_logprobs is not None:
            # the previous engine sent them with its first delta; this engine's prefill would send them again
            raise EngineError("resume", "cannot be combined with prompt_logprobs")
        if k >= params.max_tokens:
            raise EngineError(
                "resume.token_ids", f"{k} tokens leave nothing to generate under max_tokens {params.max_tokens}"
            )
        if num_prompt + k >= self.max_model_len:
            raise EngineError(
                "resume.token_ids",
                f"{num_prompt} prompt + {k} resumed tokens leave nothing to "
                f"generate under max_model_len {self.max_model_len}",
            )
        bad = next((i for i, t in enumerate(resume.token_ids) if t >= self.vocab_size), None)
        if bad is not None:
            raise EngineError(
                "resume.token_ids",
                f"{resume.token_ids[bad]} at index {bad} is not below the vocab size {self.vocab_size}",
            )
        # params already carry the extra end-of-text ids among their stop tokens
        end = next((i for i, t in enumerate(resume.token_ids) if stop_token(t, params, self.eos_id)), None)
        if end is not None:
            raise EngineError(
                "resume.token_ids", f"already finished: token {resume.token_ids[end]} at index {end} is a stop token"
            )

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise EngineError("prompt", "this model has no tokenizer; send token ids")
        return self.tokenizer
