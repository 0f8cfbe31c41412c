"""Cluster chunks -> OpenAI response objects: whole (``Collector``) or as server-sent events (``SseEncoder``).

Reasoning text goes to ``reasoning_content``, never into ``content``. A token's logprob names the
token as ``token_id:<id>`` (the front door holds no tokenizer); ``bytes`` is null.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cluster.frontdoor.errors import Refusal
from cluster.frontdoor.http.requests import CHAT, HttpRequest
from cluster.types import (
    DEADLINE_EXCEEDED,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    Chunk,
)
from engine.types import TokenLogprob, ToolCallDelta, Usage

# each refusal code: (HTTP status, OpenAI error type)
STATUS: dict[str, tuple[int, str]] = {
    INVALID_ARGUMENT: (400, "invalid_request_error"),
    FAILED_PRECONDITION: (400, "invalid_request_error"),
    UNAUTHENTICATED: (401, "authentication_error"),
    PERMISSION_DENIED: (403, "permission_error"),
    NOT_FOUND: (404, "not_found_error"),
    RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    UNAVAILABLE: (503, "service_unavailable"),
    DEADLINE_EXCEEDED: (504, "timeout"),
}
TOKEN_FORMAT = "token_id:{}"


def error_body(refusal: Refusal) -> dict[str, Any]:
    _, kind = STATUS.get(refusal.code, (500, "server_error"))
    return {"error": {"message": refusal.details, "type": kind, "param": refusal.field or None, "code": refusal.code}}


def usage_dict(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _token(token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": TOKEN_FORMAT.format(token_id), "logprob": logprob, "bytes": None}


def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for lp in lps:
        top = sorted(lp.top.items(), key=lambda kv: -kv[1])
        content.append({**_token(lp.token_id, lp.logprob), "top_logprobs": [_token(t, v) for t, v in top]})
    return {"content": content}


def completion_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "tokens": [TOKEN_FORMAT.format(lp.token_id) for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{TOKEN_FORMAT.format(t): v for t, v in lp.top.items()} for lp in lps],
    }


def _tool_call_delta(d: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": d.index}
    if d.id is not None:
        out["id"], out["type"] = d.id, "function"
    fn: dict[str, Any] = {"arguments": d.arguments}
    if d.name is not None:
        fn["name"] = d.name
    out["function"] = fn
    return out


class _Response:
    """The envelope every object of one response shares."""

    def __init__(self, options: HttpRequest, client_id: str, model: str):
        self.options, self.model = options, model
        chat = options.kind == CHAT
        self.id = ("chatcmpl-" if chat else "cmpl-") + client_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}


class Collector(_Response):
    """A whole (non-streamed) response: chunks add up; ``body()`` once the call ended."""

    progress = False  # nothing is sent before the end: no heartbeats

    def __init__(self, options: HttpRequest, client_id: str, model: str):
        super().__init__(options, client_id, model)
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def heartbeat(self) -> None:
        return None

    def encode(self, chunk: Chunk) -> list[None]:
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning_text)
        self.logprobs.extend(chunk.logprobs or ())
        for d in chunk.tool_calls or ():
            call = self.calls.setdefault(d.index, {"id": None, "type": "function", "function": {"name": None}})
            call["id"] = call["id"] or d.id
            call["function"]["name"] = call["function"]["name"] or d.name
            call["function"]["arguments"] = call["function"].get("arguments", "") + d.arguments
        if chunk.finished:
            self.finish_reason, self.usage = chunk.finish_reason, chunk.usage
        return []

    def body(self) -> dict[str, Any]:
        text, reasoning = "".join(self.text), "".join(self.reasoning)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason, "logprobs": None}
        if self.options.kind == CHAT:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text or None,
                "reasoning_content": reasoning or None,
            }
            if self.calls:
                message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
            choice["message"] = message
            if self.options.logprobs:
                choice["logprobs"] = chat_logprobs(self.logprobs)
        else:
            choice["text"] = text
            if reasoning:
                choice["reasoning_content"] = reasoning
            if self.options.logprobs:
                choice["logprobs"] = completion_logprobs(self.logprobs)
        out = self.envelope(self.object, [choice])
        out["usage"] = usage_dict(self.usage) if self.usage is not None else None
        return out


def sse(obj: object) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keepalive\n\n"  # an SSE comment: clients skip it, proxies see a live stream


class SseEncoder(_Response):
    """A streamed response: one ``chat.completion.chunk`` (or ``text_completion``) event per chunk with
    news, then the usage event when asked (``stream_options.include_usage``), then ``[DONE]``."""

    def __init__(self, options: HttpRequest, client_id: str, model: str):
        super().__init__(options, client_id, model)
        self._started = False
        self.object = "chat.completion.chunk" if options.kind == CHAT else "text_completion"

    @property
    def progress(self) -> bool:
        """Keepalives only once the response began: before, the status line is still to be decided."""
        return self._started

    def heartbeat(self) -> str:
        return KEEPALIVE

    def encode(self, chunk: Chunk) -> list[str]:
        out = []
        calls = chunk.tool_calls
        if chunk.text or chunk.reasoning_text or calls or (chunk.finished or chunk.token_ids):
            out.append(self._event(self._choice(chunk, calls)))
        if chunk.finished:
            if self.options.include_usage:
                usage = usage_dict(chunk.usage) if chunk.usage is not None else None
                out.append(sse({**self.envelope(self.object, []), "usage": usage}))
            out.append(DONE)
        self._started = self._started or bool(out)
        return out

    def _event(self, choice: dict[str, Any]) -> str:
        body = self.envelope(self.object, [choice])
        if self.options.include_usage:
            body["usage"] = None  # as OpenAI does: null on every event but the last
        return sse(body)

    def _choice(self, chunk: Chunk, calls: list[ToolCallDelta] | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason, "logprobs": None}
        if self.options.kind == CHAT:
            delta: dict[str, Any] = {} if self._started else {"role": "assistant"}
            if chunk.text:
                delta["content"] = chunk.text
            if chunk.reasoning_text:
                delta["reasoning_content"] = chunk.reasoning_text
            if calls:
                delta["tool_calls"] = [_tool_call_delta(d) for d in calls]
            choice["delta"] = delta
            if self.options.logprobs and chunk.logprobs:
                choice["logprobs"] = chat_logprobs(chunk.logprobs)
        else:
            choice["text"] = chunk.text
            if chunk.reasoning_text:
                choice["reasoning_content"] = chunk.reasoning_text
            if self.options.logprobs and chunk.logprobs:
                choice["logprobs"] = completion_logprobs(chunk.logprobs)
        return choice
