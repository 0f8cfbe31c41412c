"""Short error details: what a refusal echoes of the client's input, and every status the door sends.

A grpc client drops a response whose metadata is over 16 KB (its hard limit) and reports
RESOURCE_EXHAUSTED instead of our status, so details that echo a large input would hide the real
error. Every echoed value goes through ``clip``, and every abort through ``short`` as well.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

MAX_VALUE_CHARS = 60  # an echoed client value: enough to recognise it
MAX_DETAILS_CHARS = 300  # a whole status message: a few lines, far below grpc's 8 KB soft metadata limit


def clip(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` in at most ``limit`` characters (and its size when cut), for echoing client input."""
    if not isinstance(value, (str, bytes, list, tuple)):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}..."
    text = repr(value[:limit])  # never the repr of the whole 900 KB
    if len(value) <= limit and len(text) <= limit:
        return text
    unit = "chars" if isinstance(value, str) else "bytes" if isinstance(value, bytes) else "items"
    return f"{text[:limit]}... ({len(value)} {unit})"


def short(details: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``details`` cut to ``limit`` characters (the field name comes first, so it survives)."""
    return details if len(details) <= limit else f"{details[: limit - 20]}... ({len(details)} chars)"


class Refusal(Exception):
    """A call the front door ends with an error, whatever the transport: ``code`` is one of
    ``cluster.types.ERROR_CODES`` (gRPC maps it onto a status, HTTP onto a status code)."""

    def __init__(self, code: str, details: str, field: str = "", retry_after_ms: int | None = None):
        super().__init__(short(details))
        self.code = code
        self.details = short(details)
        self.field = field  # the request field at fault ("" when none): HTTP's ``param``
        self.retry_after_ms = retry_after_ms  # set when the caller may retry after this long


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort`` with details that always reach the client."""
    await context.abort(code, short(details))
    raise AssertionError("unreachable: context.abort raises")
