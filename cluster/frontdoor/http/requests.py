"""OpenAI request bodies -> cluster ``GenerateRequest``: every field checked, each refusal naming it.

A field this server does not take is refused when it is set (``frequency_penalty: not supported``),
never dropped: a client that asks for a penalty must not get an answer without one. ``null`` is unset.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cluster.config import InputLimitsConfig
from cluster.frontdoor.convert import Limits, RequestError, cap_schema, cap_tools, over
from cluster.frontdoor.errors import Refusal, clip
from cluster.types import AUTO, NOT_FOUND, REQUEST_EFFORTS, GenerateRequest, Prompt
from engine.types import EngineError, SamplingParams, StructuredOutput, ToolSpec

CHAT, COMPLETION = "chat", "completion"
_COMMON = ("model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "user", "stream", "stream_options")
_EXTRA = ("reasoning_effort",)  # (plus `auto`): an extension for completions
FIELDS = {
    CHAT: frozenset(
        _COMMON
        + _EXTRA
        + ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format")
    ),
    COMPLETION: frozenset(_COMMON + _EXTRA + ("prompt", "logprobs")),
}
# Set to these, a field asks for nothing: accepted (clients such as LangChain send them by default).
_NEUTRAL: dict[str, object] = {"frequency_penalty": 0, "presence_penalty": 0, "echo": False, "best_of": 1}
CHAT_ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_FIELDS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls"},
    "tool": {"role", "content", "tool_call_id"},
}  # name: taken, and not used (as `user`)
TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class HttpRequest:
    """A decoded body and what its response needs that the cluster request does not carry."""

    kind: str  # CHAT or COMPLETION
    stream: bool
    include_usage: bool  # stream_options.include_usage
    logprobs: bool


def _type(body: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    """``body[name]`` (None when unset), refused unless it is of ``kinds`` (a bool is no number)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise RequestError(name, f"must be {what}, got {clip(value)}")
    if not isinstance(value, kinds):
        raise RequestError(name, f"must be {what}, got {clip(value)}")
    return value


def check_fields(body: Mapping[str, Any], kind: str) -> None:
    for name, value in body.items():
        if name in FIELDS[kind] or value is None:
            continue
        neutral = _NEUTRAL.get(name, ...)
        if neutral is not ... and value == neutral and type(value) is type(neutral):
            continue
        raise RequestError(clip(name, 40).strip("'"), "not supported")


def _model(body: Mapping[str, Any], limits: Limits) -> None:
    model = _type(body, "model", str, "a string")
    if model is None:
        raise RequestError("model", "missing; this server serves " + repr(limits.model_name))
    over("model", len(model), limits.inputs.max_model_name_chars, "max_model_name_chars", "characters")
    if model != limits.model_name:
        raise Refusal(
            NOT_FOUND, f"model: unknown model {clip(model)}; this server serves {limits.model_name!r}", "model"
        )


def _content(value: Any, where: str) -> str | None:
    """A message's content: a string, or a list of text parts (joined); None when absent."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(where, f"must be a string or a list of text parts, got {clip(value)}")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{i}]", "only text parts are supported ({'type': 'text', 'text': ...})")
        texts.append(part["text"])
    return "".join(texts)


def _message(m: Any, i: int, caps: InputLimitsConfig) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RequestError(where, f"must be an object, got {clip(m)}")
    role = m.get("role")
    if not isinstance(role, str):
        raise RequestError(f"{where}.role", f"must be a string, got {clip(role)}")
    over(f"{where}.role", len(role), caps.max_role_chars, "max_role_chars", "characters")
    if role not in CHAT_ROLES:
        raise RequestError(f"{where}.role", f"must be one of {CHAT_ROLES}, got {clip(role)}")
    for key, value in m.items():  # a message field we would drop is refused, as a request field is
        if value is not None and key not in _MESSAGE_FIELDS[role]:
            raise RequestError(f"{where}.{clip(key, 40).strip(chr(39))}", f"not supported in a {role} message")
    out: dict[str, Any] = {"role": role, "content": _content(m.get("content"), f"{where}.content")}
    if role == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
    elif role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise RequestError(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
        out["tool_call_id"] = m["tool_call_id"]
    if not out["content"] and "tool_calls" not in out:  # as a raw prompt: an empty message is a mistake
        raise RequestError(f"{where}.content", "must not be empty")
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise RequestError(where, "must be a list")
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(c.get("id"), str):
            raise RequestError(f"{where}[{i}]", "must be {'id', 'type': 'function', 'function': {'name', 'arguments'}}")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            raise RequestError(f"{where}[{i}].function.arguments", "must be a string of JSON")
        out.append({"id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _messages(body: Mapping[str, Any], caps: InputLimitsConfig) -> list[dict[str, Any]]:
    messages = _type(body, "messages", list, "a list of messages")
    if not messages:
        raise RequestError("messages", "must not be empty")
    over("messages", len(messages), caps.max_chat_messages, "max_chat_messages", "messages")
    return [_message(m, i, caps) for i, m in enumerate(messages)]


def _prompt(body: Mapping[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt", "must not be empty")
        return prompt
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise RequestError("prompt", "must be a string or a list of token ids (one prompt per request)")
    if not prompt:
        raise RequestError("prompt", "must not be empty")
    if min(prompt) < 0:
        raise RequestError("prompt", f"token ids must be >= 0, got {min(prompt)}")
    return prompt


def _stop(body: Mapping[str, Any], caps: InputLimitsConfig) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop", "must be a string or a list of strings")
    over("stop", len(stops), caps.max_stop_strings, "max_stop_strings", "stop strings")
    for i, s in enumerate(stops):
        over(f"stop[{i}]", len(s), caps.max_stop_string_chars, "max_stop_string_chars", "characters")
    return tuple(stops)


def _max_tokens(body: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are sent
        value = _type(body, name, int, "an integer")
        if value is not None:
            if not 1 <= value <= limits.max_model_len:
                raise RequestError(name, f"must be in [1, {limits.max_model_len}], got {value}")
            return {"max_tokens": value}
    return {}


def _logprobs(body: Mapping[str, Any], kind: str, caps: InputLimitsConfig) -> int | None:
    top = caps.max_logprobs
    if kind == COMPLETION:
        n = _type(body, "logprobs", int, "an integer")
        if n is not None and not 0 <= n <= top:
            raise RequestError("logprobs", f"must be in [0, {top}], got {n} (frontdoor.limits.max_logprobs)")
        return n
    wanted = _type(body, "logprobs", bool, "true or false")
    n = _type(body, "top_logprobs", int, "an integer")
    if n is not None and not 0 <= n <= top:
        raise RequestError("top_logprobs", f"must be in [0, {top}], got {n} (frontdoor.limits.max_logprobs)")
    if n is not None and not wanted:
        raise RequestError("top_logprobs", "needs logprobs: true")
    return (n or 0) if wanted else None


def _tools(body: Mapping[str, Any], caps: InputLimitsConfig) -> tuple[ToolSpec, ...]:
    tools = _type(body, "tools", list, "a list of tools")
    out = []
    for i, t in enumerate(tools or ()):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}]", "must be {'type': 'function', 'function': {'name', ...}}")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise RequestError(f"tools[{i}].function.description", "must be a string")
        parameters = fn.get("parameters", {})
        if not isinstance(parameters, dict):
            raise RequestError(f"tools[{i}].function.parameters", "must be a JSON Schema object")
        out.append(ToolSpec(fn["name"], description, json.dumps(parameters)))
    cap_tools(out, caps)
    return tuple(out)


def _tool_choice(body: Mapping[str, Any], tools: tuple[ToolSpec, ...]) -> str | None:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in {t.name for t in tools}:
            raise RequestError("tool_choice", f"names no tool in tools: {clip(choice)}")
        return choice
    if choice not in TOOL_CHOICES:
        raise RequestError("tool_choice", f"must be one of {TOOL_CHOICES} or {{'type': 'function', ...}}")
    if choice != "none" and not tools:
        raise RequestError("tool_choice", f"{choice!r} needs tools")
    return choice


def _response_format(body: Mapping[str, Any], caps: InputLimitsConfig) -> StructuredOutput | None:
    fmt = _type(body, "response_format", dict, "an object")
    structured = None if fmt is None else StructuredOutput.from_openai(fmt)  # ValueError names the field
    cap_schema(structured, caps)
    return structured


def _params(body: Mapping[str, Any], kind: str, limits: Limits) -> SamplingParams:
    given: dict[str, Any] = _max_tokens(body, limits)
    for name in ("temperature", "top_p"):
        value = _type(body, name, (int, float), "a number")
        if value is not None:
            given[name] = float(value)
    seed = _type(body, "seed", int, "an integer")
    tools = _tools(body, limits.inputs) if kind == CHAT else ()
    try:
        return SamplingParams(
            seed=seed,
            stop=_stop(body, limits.inputs),
            logprobs=_logprobs(body, kind, limits.inputs),
            tools=tools,
            tool_choice=_tool_choice(body, tools) if kind == CHAT else None,
            structured=_response_format(body, limits.inputs) if kind == CHAT else None,
            **given,
        )
    except ValueError as e:  # SamplingParams (and its parts) name the field first, as our errors do
        err = EngineError.from_value_error(e)
        raise RequestError(err.field, err.message) from None


def _options(body: Mapping[str, Any], kind: str) -> HttpRequest:
    stream = bool(_type(body, "stream", bool, "true or false"))
    options = _type(body, "stream_options", dict, "an object")
    if options is not None and not stream:
        raise RequestError("stream_options", "only with stream: true")
    include = False if options is None else options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("stream_options.include_usage", "must be true or false")
    n = _type(body, "n", int, "an integer")
    if n not in (None, 1):
        raise RequestError("n", f"only 1 choice per request, got {n}")
    _type(body, "user", str, "a string")  # taken, and not used
    logprobs = body.get("logprobs") is not None and body.get("logprobs") is not False  # completions' 0: on
    return HttpRequest(kind, stream, include, logprobs)


def decoder(body: Mapping[str, Any], kind: str) -> tuple[HttpRequest, Callable[[Limits], GenerateRequest]]:
    """What the response needs, and the decode step ``FrontDoor.run`` calls with the served limits."""
    if not isinstance(body, dict):
        raise RequestError("request", "the body must be a JSON object")
    check_fields(body, kind)
    options = _options(body, kind)

    def decode(limits: Limits) -> GenerateRequest:
        _model(body, limits)
        effort = _type(body, "reasoning_effort", str, "a string")
        if effort is not None and effort not in REQUEST_EFFORTS:
            raise RequestError("reasoning_effort", f"must be one of {REQUEST_EFFORTS}, got {clip(effort)}")
        prompt: Prompt = _messages(body, limits.inputs) if kind == CHAT else _prompt(body)
        return GenerateRequest(
            request_id=uuid.uuid4().hex,
            model=limits.model_name,
            prompt=prompt,
            params=_params(body, kind, limits),
            reasoning_effort=effort or AUTO,
        )

    return options, decode
