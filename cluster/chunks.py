"""Turning engine deltas into chunks, and errors into chunks, the same way everywhere."""

from __future__ import annotations

from cluster.types import ERROR_CODES, UNAVAILABLE, Chunk, ChunkError, PrefillProgress
from engine.types import EngineError, RequestDelta


def merge_deltas(deltas: list[RequestDelta]) -> Chunk:
    """One chunk carrying several deltas in order; the last one decides finished/usage.

    Every abort we ask for ends the stream on our side before its final delta
    is read, so a final ``abort`` seen here is the engine's own: it stopped
    (shutdown, a lost expert-parallel peer). That is UNAVAILABLE: retryable.
    """
    chunk = Chunk()
    for d in deltas:
        chunk.token_ids.extend(d.token_ids)
        chunk.text += d.text
        chunk.reasoning_text += d.reasoning_text
        if d.logprobs:
            chunk.logprobs = (chunk.logprobs or []) + d.logprobs
        if d.tool_calls:
            chunk.tool_calls = (chunk.tool_calls or []) + d.tool_calls
        if d.prompt_tokens_done is not None:
            chunk.progress = PrefillProgress(d.prompt_tokens_done, d.prompt_tokens_total or d.prompt_tokens_done)
        if d.finished:
            chunk.finished, chunk.finish_reason, chunk.usage = True, d.finish_reason, d.usage
    if chunk.finished and chunk.finish_reason == "abort":
        chunk.error = ChunkError(UNAVAILABLE, "engine", "the engine stopped the request; retry")
    return chunk


def error_chunk(code: str, field: str, message: str) -> Chunk:
    # an error kind we do not know: treat it as transient rather than blame the caller
    return Chunk(finished=True, error=ChunkError(code if code in ERROR_CODES else UNAVAILABLE, field, message))


def engine_error_chunk(e: EngineError) -> Chunk:
    return error_chunk(e.kind, e.field, e.message)
