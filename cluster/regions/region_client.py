"""``RegionClient``: the Python client library for services that call Levante regions directly.

It holds its own ordered list of front doors (one per region) and does what each front door's
region router does, one level up: active health checks and outlier ejection per region, the
next region when one fails before the stream starts, and a broken stream resumed in the next
region (same seed and effort), so the caller sees one stream.

How a broken stream resumes depends on the caller's role. An end client (a tenant's key, or none)
may not send ``resume``: a region would take its tokens on trust. So by default the client replays:
it asks the next region again, from the start, and passes on only what comes after the tokens it
already yielded, checking that the replay's first tokens are those (if not, the stream ends with
FAILED_PRECONDITION on ``resume``). That costs the next region the tokens again. A client holding a
peer key (``peer=True``, e.g. an operator's drill tool) resumes in place instead.

    async def main() -> None:
        async with RegionClient(["eu-west=10.0.0.1:50051", "us-east=10.1.0.1:50051"]) as client:
            async for chunk in client.generate("What is the capital of France?", max_tokens=32):
                print(chunk.text, end="")

    asyncio.run(main())

A plain string is sent as one user chat message (the model's chat template applies), as
``levante client generate`` does; ``raw=True`` sends it as a raw prompt instead.
Chunks are ``cluster.types.Chunk``: ``text``, ``reasoning_text``, ``token_ids``; the last one has
``finished``, ``usage``, ``served_by`` and ``failovers`` (every region the request left, and why).

Tools: ``generate(..., tools=[...], tool_choice=...)`` takes ``ToolSpec``s or OpenAI-shaped tool
dicts; the model's calls stream in ``Chunk.tool_calls``, and ``collect`` adds a stream up into a
``Reply`` whose ``tool_calls`` are whole (docs/serving.md, "Tool calls").
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from cluster.backends.failover import FailoverBackend
from cluster.backends.peer import PeerBackend
from cluster.config import HealthCheckConfig, PeerConfig, RegionsConfig
from cluster.regions.checker import HealthChecker
from cluster.regions.health_book import HealthBook
from cluster.telemetry.tracing import ambient_carrier
from cluster.types import AUTO, Chunk, GenerateRequest, Prompt
from engine.types import SamplingParams, StructuredOutput, ToolCallDelta, ToolSpec, merge_tool_calls


def tool_spec(tool: ToolSpec | dict) -> ToolSpec:
    """A tool given as a ``ToolSpec`` or in OpenAI's shape (``{"type": "function", "function": {...}}``,
    or the function object itself), its ``parameters`` a JSON Schema object or its JSON text."""
    if isinstance(tool, ToolSpec):
        return tool
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('tools: each tool is a ToolSpec or a dict with a "name" (or a "function" holding one)')
    params = fn.get("parameters") or {}
    return ToolSpec(fn["name"], fn.get("description") or "", params if isinstance(params, str) else json.dumps(params))


@dataclass
class Reply:
    """A whole answer: its text, its tool calls (each with its whole arguments) and its final chunk."""

    text: str = ""
    reasoning_text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    final: Chunk | None = None  # the last chunk: finish_reason, usage, served_by, error when it ended right


async def collect(chunks: AsyncIterator[Chunk], each: Callable[[Chunk], None] | None = None) -> Reply:
    """Add up a stream (``each`` sees every chunk on the way)."""
    reply, deltas = Reply(), []
    async for chunk in chunks:
        if each is not None:
            each(chunk)
        reply.text += chunk.text
        reply.reasoning_text += chunk.reasoning_text
        deltas += chunk.tool_calls or []
        reply.final = chunk
    reply.tool_calls = merge_tool_calls(deltas)
    return reply


def parse_endpoint(spec: str | PeerConfig) -> PeerConfig:
    """``name=host:port`` (or a bare ``host:port``, named after itself) as a ``PeerConfig``."""
    if isinstance(spec, PeerConfig):
        return spec
    name, sep, target = spec.partition("=")
    return PeerConfig(name=name, target=target) if sep else PeerConfig(name=spec, target=spec)


class RegionClient:
    def __init__(
        self,
        endpoints: Sequence[str | PeerConfig],
        health: HealthCheckConfig = HealthCheckConfig(),
        max_attempts: int | None = None,
        model: str = "",
        api_key: str | None = None,
        peer: bool = False,
    ):
        peers = [parse_endpoint(e) for e in endpoints]
        if not peers:
            raise ValueError("endpoints: give at least one front door")
        self.peers = [PeerBackend(p, api_key=api_key) for p in peers]
        members = {p.peer.name: p for p in self.peers}
        if len(members) != len(peers):
            raise ValueError("endpoints: region names must be unique")
        self.book = HealthBook(health, members)
        cfg = RegionsConfig(health=health, max_attempts=max_attempts or len(peers))
        # not a peer: resume by replay (no region takes a `resume` from an end client)
        self.backend = FailoverBackend(members, self.book, cfg, local=None, by_latency=False, replay=not peer)
        self.checker = HealthChecker(self.book, {p.peer.name: p.check for p in self.peers})
        self.model = model

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    def start(self) -> None:
        """Begin the active health checks (in the running event loop)."""
        self.checker.start()

    async def close(self) -> None:
        await self.checker.stop()
        for peer in self.peers:
            await peer.close()

    def generate(
        self,
        prompt: Prompt,
        *,
        raw: bool = False,
        effort: str = AUTO,
        preferred_region: str | None = None,
        timeout_s: float | None = None,
        first_token_timeout_s: float | None = None,
        request_id: str | None = None,
        tools: Sequence[ToolSpec | dict] = (),
        tool_choice: str | None = None,
        response_format: StructuredOutput | dict | None = None,
        **sampling,
    ) -> AsyncIterator[Chunk]:
        """Stream one answer. ``prompt``: text, token ids or chat messages; ``sampling``: SamplingParams
        fields (max_tokens, temperature, seed, stop, ...). Errors come as a final chunk with ``error``
        (its ``origin``: the front door that answered with it). ``first_token_timeout_s``: no first
        token within this (across every region tried) ends it with DEADLINE_EXCEEDED, blaming no region.
        Chunks that only report a long prompt's prefill have ``progress`` and no text.

        Text is sent as one user chat message, so the model's chat template applies (without it an
        instruct model tends to answer nothing); ``raw=True`` sends it as a raw prompt, as is.
        ``tools`` (ToolSpecs or OpenAI-shaped dicts) and ``tool_choice`` ("auto", "none", "required"
        or a tool's name): the model's calls arrive in ``Chunk.tool_calls``.

        ``response_format`` constrains the answer to JSON: a ``StructuredOutput``, or OpenAI's object
        (``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": True}}``).
        """
        if isinstance(prompt, str) and not raw:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(response_format, dict):
            response_format = StructuredOutput.from_openai(response_format)
        if response_format is not None:
            sampling["structured"] = response_format
        request = GenerateRequest(
            request_id=request_id or uuid.uuid4().hex,
            model=self.model,
            prompt=prompt,
            params=SamplingParams(tools=tuple(tool_spec(t) for t in tools), tool_choice=tool_choice, **sampling),
            reasoning_effort=effort,
            preferred_region=preferred_region,
            deadline=None if timeout_s is None else time.time() + timeout_s,
            first_token_timeout_s=first_token_timeout_s,
            trace_context=ambient_carrier(),
        )  # the caller's current span, if it traces: the regions join its trace
        return self.backend.generate(request)
