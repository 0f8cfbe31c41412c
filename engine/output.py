"""Turns engine-core token outputs into text deltas and finished outputs.

Per request: the reasoning split, incremental detokenization of each
channel, stop strings (checked on the answer text, which holds back a tail
that could still become a stop string), logprobs and usage. A resumed
request first replays the outputs another engine produced, silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.core.request import SamplingParams
from engine.core.stop import find_stop_string, stop_string_hold
from engine.reasoning import ANSWER, REASONING, ReasoningState
from engine.structured.answer import AnswerConstraint
from engine.tokenizer import Tokenizer
from engine.toolcalls import ToolCallParser, final_reason, parses_calls
from engine.types import RequestDelta, RequestOutput, TokenLogprob, ToolCallDelta, Usage, merge_tool_calls


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas without re-decoding all of it.

    Decodes a short window before the new tokens, so tokenizers that merge
    pieces (leading spaces, byte fallback) produce the same text as a full
    decode; an incomplete UTF-8 sequence (U+FFFD at the end) waits for more.
    """

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def feed(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        return self._delta(final=False) if ids else ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character included), at the end."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.tokenizer is None or self._read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        if final:
            self._prefix = self._read = len(self.ids)
        else:  # the next window starts at the tokens just decoded
            self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]


def collect_output(
    prompt_token_ids: list[int], params: SamplingParams, deltas: Sequence[RequestDelta]
) -> RequestOutput:
    """A finished request's whole output from its deltas, in order, the last one finished.

    The same as its ``RequestState.to_output`` at the end (for a request that
    was not resumed): tokens, texts and logprobs are what the deltas add up
    to, the rest comes with the final delta.
    """
    final = deltas[-1]
    return RequestOutput(
        request_id=final.request_id,
        prompt_token_ids=prompt_token_ids,
        token_ids=[t for d in deltas for t in d.token_ids],
        text="".join(d.text for d in deltas),
        reasoning_text="".join(d.reasoning_text for d in deltas),
        finish_reason=final.finish_reason,
        stop_reason=final.stop_reason,
        usage=final.usage,  # type: ignore[arg-type]
        logprobs=[lp for d in deltas for lp in d.logprobs or []] if params.logprobs is not None else None,
        prompt_logprobs=final.prompt_logprobs,
        timings=final.timings,
        tool_calls=merge_tool_calls([c for d in deltas for c in d.tool_calls or []]) if parses_calls(params) else None,
    )


def merge_final(step: RequestDelta, final: RequestDelta) -> RequestDelta:
    """One delta for a request's last step and its end: the step's tokens and text, then what ``finish`` flushed."""
    final.token_ids = step.token_ids + final.token_ids
    final.text, final.reasoning_text = step.text + final.text, step.reasoning_text + final.reasoning_text
    final.logprobs = (step.logprobs or []) + (final.logprobs or []) if (step.logprobs or final.logprobs) else None
    calls = (step.tool_calls or []) + (final.tool_calls or [])
    final.tool_calls = calls or None
    return final


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reasoning: ReasoningState
    tokenizer: Tokenizer | None
    token_ids: list[int] = field(default_factory=list)
    answer: str = ""  # answer text so far (stop string cut applied)
    answer_sent: int = 0  # chars of ``answer`` already streamed
    reasoning_text: str = ""
    reasoning_sent: int = 0  # chars of ``reasoning_text`` already streamed
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: int | str | None = None
    stopped_by_string: bool = False
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, known at the end
    # With tools: the parser the answer text goes through, and the ids of the format's control tokens
    # (special tokens that decoding drops) with the marker text the parser reads in their place.
    tool_parser: ToolCallParser | None = None
    tool_marks: dict[int, str] = field(default_factory=dict)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)  # every call delta so far
    constraint: AnswerConstraint | None = None  # response_format's grammar over the answer, if any

    def __post_init__(self) -> None:
        self._answer_detok = IncrementalDetokenizer(self.tokenizer)
        self._reasoning_detok = IncrementalDetokenizer(self.tokenizer)
        self._hold = stop_string_hold(self.params.stop)
        if self.params.logprobs is not None:
            self.logprobs = []

    def add_tokens(self, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> RequestDelta:
        """Classify and decode new tokens; a stop string sets ``stopped_by_string``."""
        self.token_ids.extend(token_ids)
        if self.logprobs is not None and logprobs:
            self.logprobs.extend(logprobs)
        released = []
        for t in token_ids:
            if self.constraint is not None:
                self.constraint.accept(t)
            released += self.reasoning.feed(t)
        return self._decode(released, token_ids, logprobs, final=False)

    @property
    def grammar_terminated(self) -> bool:
        """The constrained answer is complete (or went wrong): the request ends here."""
        return self.constraint is not None and self.constraint.done

    def next_token_bitmask(self, vocab_size: int) -> np.ndarray | None:
        """The tokens allowed next, [ceil(vocab_size / 32)] int32; None when unconstrained. Ask before the
        token is chosen (``AnswerConstraint.start``)."""
        return self.constraint.bitmask(vocab_size) if self.constraint is not None else None

    def replay(self, token_ids: Sequence[int], text_chars: int = 0, reasoning_chars: int = 0) -> None:
        """Take ``token_ids`` as outputs already produced elsewhere, streaming none of them.

        Each token goes the way a generated one goes (the reasoning state's
        ``next_token`` then ``feed``, both detokenizers one token at a time,
        stop strings), so afterwards this state is the one that produced them:
        a thinking span, its budget and a half-emitted forced marker carry on.
        The next delta starts at answer character ``text_chars`` and reasoning
        character ``reasoning_chars``, what the client has not received yet.
        Raises ``ValueError("resume.<field>: ...")`` for tokens this request
        could not have produced, or that already end it.
        """
        for i, t in enumerate(token_ids):
            if self.constraint is not None:
                self.constraint.start()  # where the engine would have asked for this token's mask
            expected = self.reasoning.next_token(t)
            if expected != t:  # the engine would have emitted a forced thinking marker here, whatever was sampled
                raise ValueError(
                    f"resume.token_ids: token {t} at index {i} cannot be there: this request emits "
                    f"{expected} (a thinking marker); were they produced with the same params?"
                )
            self.add_tokens([t], None)
            if self.constraint is not None and self.constraint.refused is not None:
                raise ValueError(f"resume.token_ids: token {t} at index {i} is not allowed by response_format")
            if self.grammar_terminated:
                raise ValueError(f"resume.token_ids: already finished: the response_format output ends at index {i}")
            if self.stopped_by_string:
                raise ValueError(
                    f"resume.token_ids: already finished: the answer reaches stop string "
                    f"{self.stop_reason!r} at index {i}"
                )
        self.answer_sent = self._delivered("text_chars", text_chars, self.answer)
        self.reasoning_sent = self._delivered("reasoning_chars", reasoning_chars, self.reasoning_text)

    @staticmethod
    def _delivered(name: str, chars: int, text: str) -> int:
        # The client cannot hold more text than the replayed tokens decode to: if it claims so, its text is not theirs.
        if chars > len(text):
            raise ValueError(
                f"resume.{name}: {chars} characters delivered, but the resumed tokens decode to only {len(text)}"
            )
        return chars

    def finish(self, finish_reason: str | None, cached_tokens: int = 0) -> RequestDelta:
        self.cached_tokens = cached_tokens
        delta = self._decode(self.reasoning.flush(), [], None, final=True)
        delta.finished, delta.finish_reason, delta.usage = (
            True,
            final_reason(finish_reason, self.tool_parser),
            self.usage(),
        )
        delta.stop_reason, delta.prompt_logprobs = self.stop_reason, self.prompt_logprobs
        return delta

    def _decode(self, released, token_ids, logprobs, final: bool) -> RequestDelta:
        reasoning_ids = [t for t, ch in released if ch == REASONING]
        answer_ids = [t for t, ch in released if ch == ANSWER]
        self.reasoning_text += self._reasoning_detok.feed(reasoning_ids) + (
            self._reasoning_detok.flush() if final else ""
        )
        # reasoning holds nothing back itself, but after a resume the client may still miss some of it
        new_reasoning, self.reasoning_sent = self.reasoning_text[self.reasoning_sent :], len(self.reasoning_text)
        calls: list[ToolCallDelta] = []
        if not self.stopped_by_string:
            text, calls = self._answer_text(answer_ids, final)
            self.answer += text
            self._check_stop_strings()
        end = (
            len(self.answer)
            if (final or self.stopped_by_string)
            else max(self.answer_sent, len(self.answer) - self._hold)
        )
        text, self.answer_sent = self.answer[self.answer_sent : end], end
        self.tool_calls += calls
        return RequestDelta(
            self.request_id,
            list(token_ids),
            text=text,
            reasoning_text=new_reasoning,
            logprobs=logprobs,
            tool_calls=calls or None,
        )

    def _answer_text(self, ids: list[int], final: bool) -> tuple[str, list[ToolCallDelta]]:
        """New answer text (content) and tool-call deltas; control tokens reach the parser as their markers."""
        detok = self._answer_detok
        if self.tool_parser is None:
            return detok.feed(ids) + (detok.flush() if final else ""), []
        text, run = "", []
        for t in ids:
            mark = self.tool_marks.get(t)
            if mark is None:
                run.append(t)
            else:  # decode what came before on its own: the marker must land between the right characters
                text, run = text + detok.feed(run) + detok.flush() + mark, []
        out = self.tool_parser.feed(text + detok.feed(run) + (detok.flush() if final else ""))
        if final:
            rest = self.tool_parser.finish()
            out.text, out.calls = out.text + rest.text, out.calls + rest.calls
        return out.text, out.calls

    def _check_stop_strings(self) -> None:
        found = find_stop_string(
            self.answer, self.params.stop, self.answer_sent, self.params.include_stop_str_in_output
        )
        if found is not None:
            cut, stop = found
            self.answer, self.stop_reason, self.stopped_by_string = self.answer[:cut], stop, True

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=len(self.token_ids),
            reasoning_tokens=self.reasoning.num_reasoning_tokens,
            cached_tokens=self.cached_tokens,
            reasoning_effort=self.reasoning.effort,
        )

    def to_output(self, finish_reason: str | None) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.token_ids),
            text=self.answer,
            reasoning_text=self.reasoning_text,
            finish_reason=final_reason(finish_reason, self.tool_parser),
            stop_reason=self.stop_reason,
            usage=self.usage(),
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            tool_calls=merge_tool_calls(self.tool_calls) if self.tool_parser is not None else None,
        )
