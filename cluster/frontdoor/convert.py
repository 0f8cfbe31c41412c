"""Protobuf <-> cluster types: the only module that touches ``levante.v1`` message types.

The server hands bytes in and gets bytes out, so a malformed request is
ours to explain (field named) rather than a generic parse failure of grpc.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from cluster.config import InputLimitsConfig
from cluster.frontdoor.errors import clip
from cluster.frontdoor.isolation import forwarded_id
from cluster.frontdoor.wire import find_invalid_utf8
from cluster.types import AUTO, Chunk, Decision, FailoverHop, GenerateRequest, ModelInfo, PrefillProgress, ServedBy
from engine.types import (
    EngineError,
    Message,
    Resume,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from levante.v1 import inference_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "levante.v1.Inference"
# what a region sends a peer: the default cap, so a peer with default limits takes it
FORWARDED_REQUEST_ID_CHARS = InputLimitsConfig.max_request_id_chars
CHAT_ROLES = ("system", "user", "assistant", "tool")

_EFFORT_FROM_PB = {
    pb.REASONING_EFFORT_UNSPECIFIED: AUTO,  # unset: let the router decide
    pb.REASONING_EFFORT_AUTO: AUTO,
    pb.REASONING_EFFORT_NONE: "none",
    pb.REASONING_EFFORT_LOW: "low",
    pb.REASONING_EFFORT_MEDIUM: "medium",
    pb.REASONING_EFFORT_HIGH: "high",
}
_EFFORT_TO_PB = {v: k for k, v in _EFFORT_FROM_PB.items() if k != pb.REASONING_EFFORT_UNSPECIFIED}
_FINISH_TO_PB = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "malformed_tool_call": pb.FINISH_REASON_MALFORMED_TOOL_CALL,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


class RequestError(ValueError):
    """A bad request; ``str(e)`` starts with the field path (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What a request is checked against."""

    model_name: str  # the default model, and the only one served
    max_model_len: int
    max_request_bytes: int
    inputs: InputLimitsConfig = field(default_factory=InputLimitsConfig)  # frontdoor.limits


def _parse(raw: bytes, limits: Limits) -> pb.GenerateRequest:
    if len(raw) > limits.max_request_bytes:
        raise RequestError("request", f"{len(raw)} bytes is over max_request_bytes {limits.max_request_bytes}")
    try:
        return pb.GenerateRequest.FromString(raw)
    except DecodeError:
        bad = find_invalid_utf8(raw, pb.GenerateRequest.DESCRIPTOR)
        if bad:
            raise RequestError(bad, "is not valid UTF-8") from None
        raise RequestError("request", "not a valid levante.v1.GenerateRequest message") from None


def _prompt(msg: pb.GenerateRequest, caps: InputLimitsConfig) -> str | list[int] | list[Message]:
    kind = msg.WhichOneof("input")
    if kind is None:
        raise RequestError("prompt", "missing; set one of prompt, chat, prompt_token_ids")
    if kind == "prompt":
        if not msg.prompt:
            raise RequestError("prompt", "must not be empty")
        return msg.prompt
    if kind == "chat":
        return _chat(msg.chat, caps)
    ids = list(msg.prompt_token_ids.ids)
    if not ids:
        raise RequestError("prompt_token_ids.ids", "must not be empty")
    if min(ids) < 0:
        raise RequestError("prompt_token_ids.ids", f"token ids must be >= 0, got {min(ids)}")
    return ids


def over(field: str, count: int, cap: int, key: str, what: str) -> None:
    """Refuse ``count`` above its ``frontdoor.limits`` cap, naming the field and the key."""
    """Refuse ``count`` above ``cap``, naming the field, the cap and the config key that sets it."""
    if count > cap:
        raise RequestError(field, f"at most {cap} {what} (frontdoor.limits.{key}), got {count}")


def _chat(chat: pb.ChatMessages, caps: InputLimitsConfig) -> list[Message]:
    if not chat.messages:
        raise RequestError("chat.messages", "must not be empty")
    over("chat.messages", len(chat.messages), caps.max_chat_messages, "max_chat_messages", "messages")
    return [_chat_message(f"chat.messages[{i}]", m, caps) for i, m in enumerate(chat.messages)]


def _chat_message(where: str, m: pb.ChatMessage, caps: InputLimitsConfig) -> Message:
    """One message in OpenAI's shape: an assistant's tool calls, a tool's result with the id it answers."""
    over(f"{where}.role", len(m.role), caps.max_role_chars, "max_role_chars", "characters")
    if m.role not in CHAT_ROLES:
        raise RequestError(f"{where}.role", f"must be one of {CHAT_ROLES}, got {clip(m.role)}")
    if m.tool_calls and m.role != "assistant":
        raise RequestError(f"{where}.tool_calls", "only an assistant message carries tool calls")
    for name in ("tool_call_id", "name"):
        if getattr(m, name) and m.role != "tool":
            raise RequestError(f"{where}.{name}", "only a tool message carries it")
    if m.role == "tool" and not m.tool_call_id:
        raise RequestError(f"{where}.tool_call_id", "a tool message must name the call it answers")
    if not m.content and not m.tool_calls:  # as a raw prompt: an empty message is a mistake, not a question
        raise RequestError(f"{where}.content", "must not be empty")
    out: Message = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(m.tool_calls)]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
        if m.name:
            out["name"] = m.name
    return out


def _tool_call(where: str, c: pb.ToolCall) -> dict:
    for name in ("id", "name"):
        if not getattr(c, name):
            raise RequestError(f"{where}.{name}", "must not be empty")
    _json_object(f"{where}.arguments", c.arguments)
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _json_object(field: str, text: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(field, f"is not JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(value, dict):
        raise RequestError(field, f"must be a JSON object, got {type(value).__name__}")


def cap_tools(tools: Sequence[ToolSpec | pb.Tool], caps: InputLimitsConfig) -> None:
    """The tools' count and sizes within their caps (gRPC's and HTTP's alike)."""
    over("tools", len(tools), caps.max_tools, "max_tools", "tools")
    for i, t in enumerate(tools):
        size = len(t.name) + len(t.description) + len(t.parameters)
        over(f"tools[{i}]", size, caps.max_tool_schema_chars, "max_tool_schema_chars", "characters")


def cap_schema(structured: StructuredOutput | None, caps: InputLimitsConfig) -> None:
    """response_format's schema within its cap; whether the grammar engine takes it is the engine's to say."""
    if structured is not None and structured.schema is not None:
        size = len(structured.schema.encode("utf-8"))
        over("response_format.json_schema", size, caps.max_schema_bytes, "max_schema_bytes", "bytes")


def _tools(msg: pb.GenerateRequest, caps: InputLimitsConfig) -> tuple[ToolSpec, ...]:
    cap_tools(msg.tools, caps)
    tools = []
    for i, t in enumerate(msg.tools):
        if not t.name:
            raise RequestError(f"tools[{i}].name", "must not be empty")
        _json_object(f"tools[{i}].parameters", t.parameters or "{}")
        tools.append(ToolSpec(t.name, t.description, t.parameters or "{}"))
    return tuple(tools)


def _check_stops(msg: pb.GenerateRequest, caps: InputLimitsConfig) -> None:
    """Every stop string and stop id is checked at every step: their number and size are capped."""
    over("stop", len(msg.stop), caps.max_stop_strings, "max_stop_strings", "stop strings")
    for i, stop in enumerate(msg.stop):
        over(f"stop[{i}]", len(stop), caps.max_stop_string_chars, "max_stop_string_chars", "characters")
    count = len(msg.stop_token_ids)
    over("stop_token_ids", count, caps.max_stop_token_ids, "max_stop_token_ids", "stop token ids")


def _params(msg: pb.GenerateRequest, limits: Limits) -> SamplingParams:
    if msg.HasField("max_tokens") and not 1 <= msg.max_tokens <= limits.max_model_len:
        raise RequestError("max_tokens", f"must be in [1, {limits.max_model_len}], got {msg.max_tokens}")
    top = limits.inputs.max_logprobs
    if msg.HasField("logprobs") and not 0 <= msg.logprobs <= top:
        raise RequestError("logprobs", f"must be in [0, {top}], got {msg.logprobs} (frontdoor.limits.max_logprobs)")
    _check_stops(msg, limits.inputs)
    given = {
        name: getattr(msg, name)
        for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs")
        if msg.HasField(name)
    }  # unset: SamplingParams' own defaults
    try:
        return SamplingParams(
            tools=_tools(msg, limits.inputs),
            tool_choice=msg.tool_choice or None,
            top_k=msg.top_k,
            min_p=msg.min_p,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            include_stop_str_in_output=msg.include_stop_str_in_output,
            structured=_structured(msg, limits.inputs),
            **given,
        )
    except ValueError as e:  # SamplingParams and StructuredOutput name the field first, as our errors do
        err = EngineError.from_value_error(e)
        raise RequestError(err.field, err.message) from None


def _structured(msg: pb.GenerateRequest, caps: InputLimitsConfig) -> StructuredOutput | None:
    """response_format, size-capped here; whether the grammar engine takes the schema is the engine's to say."""
    if not msg.HasField("response_format"):
        return None
    rf = msg.response_format
    structured = StructuredOutput(rf.type, rf.json_schema or None, rf.name, rf.strict)
    cap_schema(structured, caps)
    return structured


def _resume(msg: pb.GenerateRequest) -> Resume | None:
    if not msg.HasField("resume"):
        return None
    r = msg.resume
    try:
        return Resume(tuple(r.token_ids), r.text_chars, r.reasoning_chars)
    except ValueError as e:  # Resume names its field ("resume.token_ids: ...")
        err = EngineError.from_value_error(e)
        raise RequestError(err.field, err.message) from None


def _check_names(msg: pb.GenerateRequest, limits: Limits) -> None:
    caps = limits.inputs
    over("model", len(msg.model), caps.max_model_name_chars, "max_model_name_chars", "characters")
    if msg.model not in ("", limits.model_name):
        raise RequestError("model", f"unknown model {clip(msg.model)}; this server serves {limits.model_name!r}")
    over("request_id", len(msg.request_id), caps.max_request_id_chars, "max_request_id_chars", "characters")
    if not msg.request_id.isprintable():
        raise RequestError("request_id", f"must be printable, got {clip(msg.request_id)}")


def decode_generate(raw: bytes, limits: Limits) -> GenerateRequest:
    """A checked ``GenerateRequest`` (tenant, max_effort and deadline are the caller's to fill)."""
    msg = _parse(raw, limits)
    _check_names(msg, limits)
    if msg.reasoning_effort not in _EFFORT_FROM_PB:
        raise RequestError("reasoning_effort", f"unknown value {msg.reasoning_effort}")
    return GenerateRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        model=limits.model_name,
        prompt=_prompt(msg, limits.inputs),
        params=_params(msg, limits),
        reasoning_effort=_EFFORT_FROM_PB[msg.reasoning_effort],
        preferred_region=msg.preferred_region if msg.HasField("preferred_region") else None,
        resume=_resume(msg),
        stream_progress=msg.stream_progress,
    )


def _decision(d: Decision | None) -> pb.RoutingDecision | None:
    return None if d is None else pb.RoutingDecision(reasoning_effort=_EFFORT_TO_PB.get(d.effort, 0), reason=d.reason)


def _logprob(lp: TokenLogprob) -> pb.TokenLogprob:
    top = sorted(lp.top.items(), key=lambda kv: -kv[1])
    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top]
    )


class ResponseEncoder:
    """Chunks of one request -> serialized responses: one Start, Deltas, one Final; with ``progress``,
    a Progress message for each chunk that reports prefill progress, and ``heartbeat()`` on demand."""

    def __init__(self, request_id: str, progress: bool = False):
        self.request_id = request_id
        self.progress = progress
        self._decision: pb.RoutingDecision | None = None
        self._served_by: ServedBy | None = None
        self._started = False
        self._last = pb.Progress()  # the latest prefill progress, repeated by heartbeats

    def heartbeat(self) -> bytes:
        """A Progress message repeating the latest progress: the stream is alive, nothing else to send."""
        return pb.GenerateResponse(progress=self._last).SerializeToString()

    def encode(self, chunk: Chunk) -> list[bytes]:
        out: list[pb.GenerateResponse] = []
        self._decision = _decision(chunk.decision) or self._decision
        self._served_by = chunk.served_by or self._served_by
        if not self._started:
            self._started = True
            out.append(pb.GenerateResponse(start=pb.Start(request_id=self.request_id, decision=self._decision)))
        if chunk.progress is not None:
            p = chunk.progress
            self._last = pb.Progress(prompt_tokens_processed=p.prompt_tokens_processed, prompt_tokens=p.prompt_tokens)
            if self.progress and not (chunk.token_ids or chunk.finished):
                out.append(pb.GenerateResponse(progress=self._last))
        if chunk.token_ids or chunk.text or chunk.reasoning_text or chunk.tool_calls:
            delta = pb.Delta(
                text=chunk.text,
                reasoning_text=chunk.reasoning_text,
                token_ids=chunk.token_ids,
                logprobs=[_logprob(lp) for lp in chunk.logprobs or ()],
                tool_calls=[
                    pb.ToolCallDelta(index=c.index, id=c.id or "", name=c.name or "", arguments=c.arguments)
                    for c in chunk.tool_calls or ()
                ],
            )
            out.append(pb.GenerateResponse(delta=delta))
        if chunk.finished:
            out.append(pb.GenerateResponse(final=self._final(chunk)))
        return [m.SerializeToString() for m in out]

    def _final(self, chunk: Chunk) -> pb.Final:
        final = pb.Final(
            finish_reason=_FINISH_TO_PB.get(chunk.finish_reason or "", 0),
            decision=self._decision,
            request_id=self.request_id,
        )
        if chunk.usage is not None:
            u = chunk.usage
            final.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    reasoning_tokens=u.reasoning_tokens,
                    cached_tokens=u.cached_tokens,
                )
            )
        if self._served_by is not None:
            final.served_by.CopyFrom(pb.ServedBy(region=self._served_by.region, replica=self._served_by.replica))
        for hop in chunk.failovers or ():
            final.failovers.add(from_region=hop.from_region, reason=hop.reason, at_token=hop.at_token)
        return final


def decode_list_models(raw: bytes) -> None:
    """ListModels takes no arguments; still reject what is not its request."""
    try:
        pb.ListModelsRequest.FromString(raw)
    except DecodeError:
        raise RequestError("request", "not a valid levante.v1.ListModelsRequest message") from None


def encode_models(models: list[ModelInfo]) -> bytes:
    return pb.ListModelsResponse(
        models=[
            pb.Model(name=m.name, max_model_len=m.max_model_len, architecture=m.architecture, ep_size=m.ep_size)
            for m in models
        ]
    ).SerializeToString()


# ---- the other way: a front door (or the client library) calling another front door ------------


def encode_generate(request: GenerateRequest) -> bytes:
    """A ``GenerateRequest`` as a peer front door reads it (same prompt, parameters, seed, resume)."""
    p = request.params
    msg = pb.GenerateRequest(
        model=request.model,
        top_k=p.top_k,
        min_p=p.min_p,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        reasoning_effort=_EFFORT_TO_PB[request.reasoning_effort],
        tools=[pb.Tool(name=t.name, description=t.description, parameters=t.parameters) for t in p.tools],
        tool_choice=p.tool_choice or "",
        request_id=forwarded_id(request.request_id, FORWARDED_REQUEST_ID_CHARS),
        stream_progress=True,  # a router and the client library judge a region by its heartbeats
    )
    for name in ("seed", "logprobs"):
        if getattr(p, name) is not None:
            setattr(msg, name, getattr(p, name))
    if isinstance(request.prompt, str):
        msg.prompt = request.prompt
    elif request.prompt and isinstance(request.prompt[0], dict):
        msg.chat.messages.extend(_chat_message_pb(m) for m in request.prompt)  # type: ignore[arg-type]
    else:
        msg.prompt_token_ids.ids.extend(request.prompt)  # type: ignore[arg-type]
    if request.preferred_region is not None:
        msg.preferred_region = request.preferred_region
    if p.structured is not None:
        s = p.structured
        msg.response_format.CopyFrom(
            pb.ResponseFormat(type=s.kind, json_schema=s.schema or "", name=s.name, strict=s.strict)
        )
    if request.resume is not None:
        r = request.resume
        msg.resume.CopyFrom(
            pb.Resume(token_ids=r.token_ids, text_chars=r.text_chars, reasoning_chars=r.reasoning_chars)
        )
    return msg.SerializeToString()


def _chat_message_pb(m: Message) -> pb.ChatMessage:
    calls = [
        pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
        for c in m.get("tool_calls") or ()
    ]
    return pb.ChatMessage(
        role=m["role"],
        content=m.get("content") or "",
        tool_calls=calls,
        tool_call_id=m.get("tool_call_id") or "",
        name=m.get("name") or "",
    )


def decode_response(raw: bytes) -> Chunk:
    """One ``GenerateResponse`` from a peer as a chunk (a Start becomes an empty chunk with the decision, a
    Progress one with its progress, a kind this version does not know an empty one: a sign of life)."""
    msg = pb.GenerateResponse.FromString(raw)
    kind = msg.WhichOneof("kind")
    if kind == "start":
        return Chunk(decision=_decision_from_pb(msg.start.decision))
    if kind == "progress":
        p = msg.progress
        known = p.prompt_tokens > 0
        return Chunk(progress=PrefillProgress(p.prompt_tokens_processed, p.prompt_tokens) if known else None)
    if kind == "delta":
        d = msg.delta
        logprobs = [
            TokenLogprob(lp.token_id, lp.logprob, {t.token_id: t.logprob for t in lp.top}) for lp in d.logprobs
        ] or None
        calls = [ToolCallDelta(c.index, c.id or None, c.name or None, c.arguments) for c in d.tool_calls] or None
        return Chunk(
            token_ids=list(d.token_ids),
            text=d.text,
            reasoning_text=d.reasoning_text,
            logprobs=logprobs,
            tool_calls=calls,
        )
    if kind != "final":
        return Chunk()
    f = msg.final
    u = f.usage
    return Chunk(
        finished=True,
        finish_reason=_FINISH_FROM_PB.get(f.finish_reason),
        usage=Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            reasoning_tokens=u.reasoning_tokens,
            cached_tokens=u.cached_tokens,
            reasoning_effort=_EFFORT_FROM_PB.get(f.decision.reasoning_effort, AUTO),
        ),
        decision=_decision_from_pb(f.decision),
        served_by=ServedBy(f.served_by.region, f.served_by.replica),
        failovers=[FailoverHop(h.from_region, h.reason, h.at_token) for h in f.failovers] or None,
    )


def _decision_from_pb(d: pb.RoutingDecision) -> Decision:
    return Decision(_EFFORT_FROM_PB.get(d.reasoning_effort, AUTO), d.reason)


def decode_models(raw: bytes) -> list[ModelInfo]:
    return [
        ModelInfo(m.name, m.max_model_len, m.architecture, m.ep_size)
        for m in pb.ListModelsResponse.FromString(raw).models
    ]
