"""Tool calls in a model's output, parsed while it streams.

``ToolCallParser`` is fed a request's answer text as it is decoded (a
model's tool-call control tokens arrive as their marker text, e.g.
``[TOOL_CALLS]``) and splits it into content, released as soon as it cannot
be the start of a call, and ``ToolCallDelta``s: a call's id and name first,
then its arguments' JSON text. Formats:

- ``mistral``: ``[TOOL_CALLS]name[ARGS]{...}`` (tokenizer v11+; ``[CALL_ID]id``
  may sit before ``[ARGS]``), one such group per call, arguments streamed as
  they come; or the older ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``.
- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
- ``json``: the whole answer is a JSON array of such objects (or one
  object), as a forced call writes it; an answer that starts otherwise is
  plain content, or with ``forced`` (the request must call a tool) malformed.

A call whose JSON does not parse, whose arguments are not an object, whose
function is not one of the request's tools, or that the output leaves
unfinished, is malformed: the parser stops parsing, and at ``finish`` gives
back the raw text of the tool-call section as content (``error`` says
why). Torch-free.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.core.request import SamplingParams, ToolSpec
from engine.types import ToolCallDelta

FORMATS = ("mistral", "hermes", "json")
TOOL_CALLS_REASON = "tool_calls"  # finish_reason of a request that made calls
MALFORMED_REASON = "malformed_tool_call"  # finish_reason of one that wrote a call it could not complete
MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MARKERS = {"mistral": (MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID), "hermes": (HERMES_OPEN, HERMES_CLOSE)}
_ID_CHARS = string.ascii_letters + string.digits


def new_call_id() -> str:
    """Nine letters and digits: the one id shape every chat format takes back (mistral-common insists on it)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def _held(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could still grow into ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolOutput:
    text: str = ""  # content released
    calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallParser:
    """One request's output, split into content and tool calls; see the module docstring."""

    def __init__(self, fmt: str, names: Sequence[str], new_id: Callable[[], str] = new_call_id, forced: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"tool_call_format: must be one of {FORMATS}, got {fmt!r}")
        self.fmt, self.names, self._new_id, self.forced = fmt, frozenset(names), new_id, forced
        self.num_calls = 0
        self.error: str | None = None
        self._mode = "start" if fmt == "json" else "content"
        self._buf = ""  # fed text not yet decided
        self._raw = ""  # the tool-call text taken so far (content again if a call is malformed)
        self._name = ""  # mistral name form: the current call's name, then id, then arguments
        self._args = ""
        self._depth, self._in_str, self._esc, self._elem = 0, False, False, -1  # JSON scan of a call list
        self._base = 1  # depth at which a list's call objects open (0: a single object)

    def feed(self, text: str) -> ToolOutput:
        out = ToolOutput()
        self._buf += text
        while self._buf and self._step(out):
            pass
        return out

    def finish(self) -> ToolOutput:
        """The end of the output: what is held back, and the raw tool text if a call was malformed."""
        out = self.feed("")
        if self._mode == "start" and self.forced:
            self._fail("the output holds no tool call, and the request must call one")
        elif self._mode in ("content", "start", "plain", "done"):
            out.text += self._buf
        elif self._mode == "args":
            self._emit_args(out, self._buf)
            self._close_named_call()
        elif self._mode != "done":
            self._fail("the output ended inside a tool call")
        self._buf = ""
        if self.error is not None:
            out.text += self._raw
        return out

    # ---- one step of the state machine: True when it consumed something and may go on ----------

    def _step(self, out: ToolOutput) -> bool:
        mode = self._mode
        if mode == "bad":
            self._take(len(self._buf))
            return False
        if mode in ("content", "plain", "done"):
            return self._content(out)
        if mode == "start":
            return self._start(out)
        if mode == "after_trigger":
            return self._after_trigger()
        if mode in ("name", "call_id"):
            return self._named_header(out)
        if mode == "args":
            return self._named_args(out)
        if mode == "hermes":
            return self._hermes(out)
        return self._scan_list(out)

    def _content(self, out: ToolOutput) -> bool:
        if self.fmt == "json" and self._mode == "done":  # only whitespace may follow a forced call list
            if self._buf.strip():
                self._fail("text after the tool calls")
            self._take(len(self._buf))
            return False
        if self._mode == "plain":
            out.text, self._buf = out.text + self._buf, ""
            return False
        marker = MISTRAL_CALLS if self.fmt == "mistral" else HERMES_OPEN
        i = self._buf.find(marker)
        if i < 0:
            keep = _held(self._buf, marker)
            out.text += self._buf[: len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        out.text += self._buf[:i]
        self._buf = self._buf[i:]
        self._take(len(marker))
        self._mode = "after_trigger" if self.fmt == "mistral" else "hermes"
        return True

    def _start(self, out: ToolOutput) -> bool:
        """json format: a list or object opens the calls; anything else is plain content."""
        body = self._buf.lstrip()
        if not body:
            return False
        if body[0] in "[{":
            self._take(len(self._buf) - len(body))
            self._begin_list(body[0])
        elif self.forced:
            self._fail("the output is not a JSON list of tool calls, and the request must call a tool")
        else:
            self._mode = "plain"
        return True

    def _after_trigger(self) -> bool:
        body = self._buf.lstrip()
        if not body:
            return False
        self._take(len(self._buf) - len(body))
        if body[0] in "[{":
            self._begin_list(body[0])
        else:
            self._mode, self._name = "name", ""
        return True

    def _begin_list(self, opener: str) -> None:
        self._mode, self._base = "list", 1 if opener == "[" else 0
        self._depth, self._in_str, self._esc, self._elem = 0, False, False, -1

    def _take(self, n: int) -> str:
        """Move ``n`` characters from the buffer into the tool-call text."""
        piece, self._buf = self._buf[:n], self._buf[n:]
        self._raw += piece
        return piece

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self._mode = "bad"
        self._take(len(self._buf))

    # ---- mistral name form: name [CALL_ID] id [ARGS] arguments -----------------------------------

    def _named_header(self, out: ToolOutput) -> bool:
        ends = [(self._buf.find(m), m) for m in (MISTRAL_ARGS, MISTRAL_CALL_ID, MISTRAL_CALLS)]
        found = [(i, m) for i, m in ends if i >= 0]
        if not found:
            return False
        i, marker = min(found)
        part = self._take(i).strip()
        self._take(len(marker))
        if self._mode == "name":
            self._name = part
            if marker == MISTRAL_CALL_ID:
                self._mode = "call_id"
                return True
            call_id = self._new_id()
        else:
            call_id = part or self._new_id()
        if marker != MISTRAL_ARGS:
            self._fail(f"{MISTRAL_ARGS} expected after the tool call's name")
        elif self._start_call(out, self._name, call_id):
            self._mode, self._args = "args", ""
        return True

    def _named_args(self, out: ToolOutput) -> bool:
        i = self._buf.find(MISTRAL_CALLS)
        if i < 0:
            keep = _held(self._buf, MISTRAL_CALLS)
            self._emit_args(out, self._take(len(self._buf) - keep))
            return False
        self._emit_args(out, self._take(i))
        self._take(len(MISTRAL_CALLS))
        if self._close_named_call():
            self._mode = "after_trigger"
        return True

    def _emit_args(self, out: ToolOutput, piece: str) -> None:
        if piece:
            self._args += piece
            out.calls.append(ToolCallDelta(self.num_calls - 1, arguments=piece))

    def _close_named_call(self) -> bool:
        try:
            args = json.loads(self._args)
        except json.JSONDecodeError as e:
            self._fail(f"the arguments of tool call {self.num_calls - 1} are not JSON: {e.msg}")
            return False
        if not isinstance(args, dict):
            self._fail(f"the arguments of tool call {self.num_calls - 1} are not a JSON object")
            return False
        self._mode = "done"
        return True

    def _start_call(self, out: ToolOutput, name: str, call_id: str) -> bool:
        if name not in self.names:
            self._fail(f"tool call {self.num_calls} names {name[:60]!r}, not one of the request's tools")
            return False
        out.calls.append(ToolCallDelta(self.num_calls, id=call_id, name=name))
        self.num_calls += 1
        return True

    # ---- JSON objects: a list of calls (mistral's older form, forced calls) and hermes tags ---------

    def _scan_list(self, out: ToolOutput) -> bool:
        text = self._take(len(self._buf))
        start = len(self._raw) - len(text)
        for k, ch in enumerate(text):
            if self._in_str:
                self._esc, self._in_str = (False, True) if self._esc else (ch == "\\", ch != '"')
            elif ch == '"':
                self._in_str = True
            elif ch in "[{":
                self._depth += 1
                if self._depth == self._base + 1 and ch == "{":
                    self._elem = start + k
            elif ch in "]}":
                self._depth -= 1
                if self._depth == self._base and self._elem >= 0:
                    self._call_object(out, self._raw[self._elem : start + k + 1])
                    self._elem = -1
                if self._depth == 0 and self._mode == "list":
                    self._mode, self._buf = "done", text[k + 1 :] + self._buf
                    self._raw = self._raw[: start + k + 1]
                    return True
            if self._mode == "bad":
                return False
        return False

    def _hermes(self, out: ToolOutput) -> bool:
        i = self._buf.find(HERMES_CLOSE)
        if i < 0:
            return False
        body = self._take(i)
        self._take(len(HERMES_CLOSE))
        self._call_object(out, body)
        if self._mode != "bad":
            self._mode = "content"
        return True

    def _call_object(self, out: ToolOutput, text: str) -> None:
        """One ``{"name": ..., "arguments": {...}}`` call, complete: parsed, checked and sent whole."""
        n = self.num_calls
        try:
            call = json.loads(text)
        except json.JSONDecodeError as e:
            self._fail(f"tool call {n} is not JSON: {e.msg}")
            return
        args = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if isinstance(args, str):  # some models write the arguments as JSON text
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
            self._fail(f'tool call {n} needs a "name" string and an "arguments" object')
            return
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else self._new_id()
        if self._start_call(out, call["name"], call_id):
            out.calls.append(ToolCallDelta(n, arguments=json.dumps(args, ensure_ascii=False)))


def parses_calls(params: SamplingParams) -> bool:
    """Whether a request's output is parsed for tool calls: it offers tools, and tool_choice is not "none"."""
    return bool(params.tools) and params.tool_choice != "none"


def forced_choice(params: SamplingParams) -> bool:
    """Whether the request must call a tool ("required" or a tool's name): its output is then a JSON call list."""
    return bool(params.tools) and params.tool_choice not in (None, "auto", "none")


def forced_call_schema(tools: Sequence[ToolSpec], choice: str) -> str:
    """The JSON Schema a forced call's output must match: a list of calls to the allowed tools.

    ``choice`` is "required" (one or more calls, to any tool) or a tool's
    name (exactly one call, to it). The output is the ``json`` format above.
    """
    allowed = [t for t in tools if choice == "required" or t.name == choice]
    if not allowed:
        raise ValueError(f"tool_choice: {choice!r:.60} is not one of the request's tools")
    variants = []
    for t in allowed:
        try:
            params = json.loads(t.parameters)
        except json.JSONDecodeError as e:
            raise ValueError(f"tools.parameters: {t.name!r} is not JSON: {e.msg}") from None
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": params or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict = {"type": "array", "items": {"anyOf": variants}, "minItems": 1}
    if choice != "required":
        schema["maxItems"] = 1
    return json.dumps(schema)


def final_reason(reason: str | None, parser: ToolCallParser | None) -> str | None:
    """A finished request's reason with its tool calls: ``tool_calls`` after calls, ``malformed_tool_call``
    after a call that could not be completed; only an ordinary stop turns into either."""
    if parser is None or reason != "stop":
        return reason
    if parser.error is not None:
        return MALFORMED_REASON
    return TOOL_CALLS_REASON if parser.num_calls else reason
