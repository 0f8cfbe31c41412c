"""``levante bench-long-doc``: one long document, asked two questions through a region with several replicas.

The first question prefills the whole document; the second shares it as a
prefix. The front door's replica router sends the second to the replica whose
prefix cache holds the document (prefix affinity), so it prefills only the
question. Both go through the real path (gRPC client -> front door -> Serve
replica), with the config's own settings. The document is token ids, so its
length is exact and no tokenizer runs in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_CONFIG = "configs/long-doc.yaml"


@dataclass(frozen=True)
class DocOptions:
    doc_tokens: int = 65536
    question_tokens: int = 16
    max_tokens: int = 8
    seed: int = 0
    vocab_size: int = 32768  # document and question ids are drawn below this (and above the special tokens)
    request_timeout_s: float = 3600.0


@dataclass(frozen=True)
class Answer:
    """One question's trip: when its first token came, where it ran, what its prefix cache gave."""

    ttft_s: float
    total_s: float
    replica: str
    prompt_tokens: int
    cached_tokens: int
    token_ids: tuple[int, ...]


def _say(msg: str) -> None:
    print(f"[bench-long-doc] {msg}", file=sys.stderr, flush=True)


def prompts(opts: DocOptions) -> tuple[list[int], list[int]]:
    """The document followed by each of two different questions."""
    rng = random.Random(opts.seed)
    doc = [rng.randrange(1000, opts.vocab_size) for _ in range(opts.doc_tokens)]
    questions = [[rng.randrange(1000, opts.vocab_size) for _ in range(opts.question_tokens)] for _ in range(2)]
    return doc + questions[0], doc + questions[1]


async def ask(stub: Any, request_id: str, prompt: Sequence[int], opts: DocOptions) -> Answer:
    from levante.v1 import inference_pb2 as pb

    req = pb.GenerateRequest(
        max_tokens=opts.max_tokens,
        temperature=0.0,
        ignore_eos=True,
        request_id=request_id,
        reasoning_effort=pb.REASONING_EFFORT_NONE,
    )
    req.prompt_token_ids.ids.extend(prompt)
    began = time.perf_counter()
    first, tokens, final = None, [], None
    async for msg in stub.Generate(req, timeout=opts.request_timeout_s):
        kind = msg.WhichOneof("kind")
        if kind == "delta" and msg.delta.token_ids:
            first = first if first is not None else time.perf_counter() - began
            tokens.extend(msg.delta.token_ids)
        elif kind == "final":
            final = msg.final
    if final is None or first is None:
        raise RuntimeError(f"{request_id}: the stream ended without tokens and a Final message")
    return Answer(
        first,
        time.perf_counter() - began,
        final.served_by.replica,
        final.usage.prompt_tokens,
        final.usage.cached_tokens,
        tuple(tokens),
    )


async def _measure(cfg, opts: DocOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    import dataclasses

    import grpc

    from cluster.config import HttpConfig
    from cluster.region import RegionServer
    from levante.v1 import inference_pb2_grpc as pb_grpc

    # gRPC on a free port; no HTTP (measured over gRPC, and its fixed port may be taken)
    cfg = dataclasses.replace(cfg, frontdoor=dataclasses.replace(cfg.frontdoor, port=0, http=HttpConfig(port=None)))
    first_prompt, second_prompt = prompts(opts)
    server = RegionServer(cfg, progress=progress)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"{cfg.frontdoor.host}:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            tag = time.time_ns()
            progress(f"question 1: a {opts.doc_tokens}-token document, cold")
            one = await ask(stub, f"doc-{tag}-1", first_prompt, opts)
            progress(
                f"question 1: first token after {one.ttft_s:.2f}s, done after {one.total_s:.2f}s, on {one.replica}"
            )
            progress("question 2: the same document, another question")
            two = await ask(stub, f"doc-{tag}-2", second_prompt, opts)
    finally:
        await server.stop()
    return {"options": asdict(opts), "first": asdict(one), "second": asdict(two)}


def format_report(result: dict[str, Any]) -> str:
    one, two = result["first"], result["second"]
    lines = [f"a {result['options']['doc_tokens']}-token document, two questions, through the front door"]
    lines.append(f"{'question':<10}{'TTFT s':>10}{'total s':>10}{'prompt':>9}{'cached':>9}  replica")
    for name, a in (("1 (cold)", one), ("2", two)):
        lines.append(
            f"{name:<10}{a['ttft_s']:>10.3f}{a['total_s']:>10.3f}{a['prompt_tokens']:>9}"
            f"{a['cached_tokens']:>9}  {a['replica']}"
        )
    same = "the same replica" if one["replica"] == two["replica"] else "ANOTHER replica"
    lines.append(
        f"TTFT ratio (question 1 / question 2): {one['ttft_s'] / two['ttft_s']:.1f}x; question 2 ran on {same}"
    )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"cluster YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--doc-tokens", type=int, default=DocOptions.doc_tokens, help="document length in tokens")
    p.add_argument("--question-tokens", type=int, default=DocOptions.question_tokens)
    p.add_argument("--max-tokens", type=int, default=DocOptions.max_tokens)
    p.add_argument("--seed", type=int, default=DocOptions.seed)
    p.add_argument(
        "--vocab-size", type=int, default=DocOptions.vocab_size, help="token ids are drawn from [1000, this)"
    )
    p.add_argument("--json", default=None, help="also write the results to this file")


def run(args) -> int:
    from cluster.config_loader import load_config

    if args.doc_tokens < 1 or args.question_tokens < 1 or args.max_tokens < 1:
        raise ValueError("--doc-tokens, --question-tokens and --max-tokens must be >= 1")
    if args.vocab_size <= 1000:
        raise ValueError("--vocab-size must be above 1000")
    opts = DocOptions(args.doc_tokens, args.question_tokens, args.max_tokens, args.seed, args.vocab_size)
    result = asyncio.run(_measure(load_config(args.config), opts, _say))
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
