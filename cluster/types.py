"""What travels between the front door, the router and the engine replicas.

Plain dataclasses, picklable across Ray. Protobuf types stop at the front
door's conversion module (``cluster.frontdoor.convert``); engine types come
only from ``engine.api``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.config import EFFORTS  # in increasing depth
from engine.types import EngineInfo, EngineStats, Resume, SamplingParams, TokenLogprob, ToolCallDelta, Usage

AUTO = "auto"
REQUEST_EFFORTS = EFFORTS + (AUTO,)

# Error codes a chunk can carry; the front door maps them onto gRPC status codes.
INVALID_ARGUMENT = "invalid_argument"
RESOURCE_EXHAUSTED = "resource_exhausted"
UNAVAILABLE = "unavailable"
DEADLINE_EXCEEDED = "deadline_exceeded"
UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
FAILED_PRECONDITION = "failed_precondition"
NOT_FOUND = "not_found"
ERROR_CODES = (
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    DEADLINE_EXCEEDED,
    UNAUTHENTICATED,
    PERMISSION_DENIED,
    FAILED_PRECONDITION,
    NOT_FOUND,
)
GRPC_NAMES = {code: code.upper() for code in ERROR_CODES}  # the gRPC status each code becomes

# gRPC metadata a region router puts on a call it forwards to a peer: the peer serves it itself
# (or fails), so a request never bounces between regions.
FORWARDED_FROM = "levante-forwarded-from"
# ... and the prefix-cache salt of its caller, so the peer keeps that caller's hits apart from its other
# callers' (the peer only ever narrows its own caller's namespace with it: see cluster.frontdoor.isolation).
CACHE_SALT = "levante-cache-salt"
# ... and the effort ceiling of the tenant who sent it, which the peer enforces (AUTO included). Both are
# trusted only from a caller with the peer role; from anyone else they are ignored and counted.
MAX_EFFORT = "levante-max-effort"

Prompt = str | list[int] | list[dict[str, Any]]  # text, token ids, or chat messages


@dataclass(frozen=True)
class GenerateRequest:
    """One validated call, as the front door hands it on."""

    request_id: str
    model: str
    prompt: Prompt
    params: SamplingParams  # everything but the effort, which has one place: reasoning_effort
    # as asked (one of REQUEST_EFFORTS) until the router decides; then the decided one of EFFORTS
    reasoning_effort: str = AUTO
    tenant: str = "anonymous"
    max_effort: str = "high"  # the tenant's ceiling
    deadline: float | None = None  # absolute time.time(); None: no deadline
    preferred_region: str | None = None
    resume: Resume | None = None  # continue a stream whose first tokens another region already sent
    forwarded_from: str | None = None  # a peer region's router sent it here: serve it here, never forward it again
    # W3C trace context (traceparent, tracestate) of the hop that sent it; None when tracing is off
    trace_context: dict[str, str] | None = None
    # the caller's limit on its first token (a tenant's setting), counted by the region router from when it
    # took the request; exceeded: DEADLINE_EXCEEDED, and no region is blamed. None: no limit
    first_token_timeout_s: float | None = None
    stream_progress: bool = False  # the caller takes Progress messages (heartbeats, prefill progress)

    def __post_init__(self) -> None:
        if self.params.reasoning_effort is not None:
            raise ValueError("params.reasoning_effort: the effort travels as GenerateRequest.reasoning_effort")
        if self.first_token_timeout_s is not None and self.first_token_timeout_s <= 0:
            raise ValueError("first_token_timeout_s: must be positive (None: no limit)")


@dataclass
class Decision:
    """The router's choice for one request, returned to the client with its reason."""

    effort: str
    reason: str
    replica: str = ""


@dataclass
class ServedBy:
    region: str
    replica: str


@dataclass
class FailoverHop:
    """A request (or its stream) moved from one region to the next."""

    from_region: str
    reason: str  # "unavailable: ...", "timeout: ...", "resource_exhausted: ..."
    at_token: int  # tokens already sent when it moved (0: before the stream started)


@dataclass
class ChunkError:
    code: str  # one of ERROR_CODES
    field: str  # the offending request field ("prompt", "max_tokens", ...) or the component; "": in message
    message: str
    origin: str | None = None  # the front door that answered with it (a peer, a client's endpoint); None: here

    @property
    def details(self) -> str:
        """What a front door sends as the gRPC status details: a relayed error's own details, unchanged."""
        return f"{self.field}: {self.message}" if self.field else self.message


@dataclass(frozen=True)
class PrefillProgress:
    """How far a request's prefill got: tokens in the KV cache, of the tokens it prefills (prompt, and a
    resumed stream's tokens)."""

    prompt_tokens_processed: int
    prompt_tokens: int


@dataclass
class Chunk:
    """Several token deltas of one request, batched so each Serve hop carries many tokens."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # answer text
    reasoning_text: str = ""  # text inside the thinking span
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked for them
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    usage: Usage | None = None  # on the final chunk
    decision: Decision | None = None  # on the first chunk the router sends
    served_by: ServedBy | None = None  # on the final chunk
    failovers: list[FailoverHop] | None = None  # on the final chunk: the regions this request left, in order
    error: ChunkError | None = None  # set: the request failed; no more chunks follow
    progress: PrefillProgress | None = None  # the latest prefill progress these deltas reported
    tool_calls: list[ToolCallDelta] | None = None


@dataclass
class ModelInfo:
    name: str
    max_model_len: int
    architecture: str = ""
    ep_size: int = 1


@dataclass(frozen=True)
class ReplicaStatus:
    """One engine replica, for operators, metrics and tests."""

    replica: str
    state: str  # starting | serving | restarting | failed | stopped
    restarts: int = 0
    last_failure: str = ""
    outstanding: int = 0  # requests it is streaming now
    stats: EngineStats | None = None  # None while its engine is not serving
    info: EngineInfo | None = None  # rank 0's figures
    ranks: tuple[EngineInfo, ...] = ()  # every rank's, rank 0 first
    time: float = 0.0  # when it answered (time.time())


class DeployError(RuntimeError):
    """A region's Serve application did not come up; the message carries the replica's own error."""


class Backend(ABC):
    """What the front door calls: a router in front of engine replicas.

    ``LocalBackend`` runs it in-process; ``ServeBackend`` goes through Ray
    Serve. One conformance suite (tests/cluster/test_backend_conformance.py)
    runs against both.
    """

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Chunks of one request; errors come as a chunk with ``error`` set, never as exceptions.

        Closing the iterator early (cancel, deadline) aborts the engine request.
        """

    @abstractmethod
    async def models(self) -> list[ModelInfo]: ...

    @abstractmethod
    async def ready(self) -> bool:
        """True when at least one replica can serve."""

    @property
    def fails_over(self) -> bool:
        """True when a request this backend cannot serve itself may still be served elsewhere (a peer region)."""
        return False
