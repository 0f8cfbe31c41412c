"""xgrammar against llguidance on JSON Schema grammars: compile time and per-step token-mask time.

For each tokenizer and schema: build the engine's tokenizer view once, compile
the schema (a fresh compiler, so no cache hit), then walk a valid instance's
tokens, timing each next-token mask and accepting the token. Prints one
markdown table (docs/benchmarks.md records it).

    python benchmarks/grammar_engines.py [--tokenizer PATH ...]

Then the cost of applying the masks to the logits (``kernels.bitmask``), per step, on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from engine.checkpoint.gguf import default_model_path
from engine.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_path

SCHEMAS: dict[str, tuple[dict | None, object]] = {
    "json_object": (None, {"a": 1, "b": [True, None, "x"]}),
    "flat, required": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        {"name": "Ada", "age": 36},
    ),
    "nested + enum + array": (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "wind": {"type": "string", "enum": ["levante", "poniente", "tramontana"]},
                "readings": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                "station": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}, "active": {"type": "boolean"}},
                    "required": ["id", "active"],
                },
            },
            "required": ["city", "wind", "readings", "station"],
        },
        {"city": "Tarifa", "wind": "levante", "readings": [12.5, 30, 41.25], "station": {"id": 7, "active": True}},
    ),
    "20 properties": (
        {
            "type": "object",
            "properties": {f"field_{i}": {"type": ["string", "integer"]} for i in range(20)},
            "required": [f"field_{i}" for i in range(20)],
        },
        {f"field_{i}": i if i % 2 else f"v{i}" for i in range(20)},
    ),
}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def bench_xgrammar(tok: Tokenizer, eos: list[int]) -> tuple[float, dict[str, tuple[float, list[float]]]]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    vocab = tok.vocab_bytes()
    tokens = [b"" if i in vocab.special_ids else t for i, t in enumerate(vocab.tokens)]
    info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=eos)
    setup = _ms(t0)
    out = {}
    for name, (schema, instance) in SCHEMAS.items():
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = (
            compiler.compile_builtin_json_grammar()
            if schema is None
            else compiler.compile_json_schema(json.dumps(schema))
        )
        matcher = xgr.GrammarMatcher(compiled)
        compile_ms = _ms(t0)
        mask = xgr.allocate_token_bitmask(1, len(tokens))
        steps = []
        for t in tok.encode(json.dumps(instance), add_special_tokens=False) + eos[:1]:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            steps.append(_ms(t0))
            assert matcher.accept_token(t), f"xgrammar refused token {t} of a valid {name} instance"
        out[name] = (compile_ms, steps)
    return setup, out


def bench_llguidance(tok: Tokenizer, eos: list[int]) -> tuple[float, dict[str, tuple[float, list[float]]]]:
    import llguidance as llg
    import llguidance.numpy as llnp

    t0 = time.perf_counter()
    vocab = tok.vocab_bytes()

    class _Vocab:  # what llguidance's TokenizerWrapper reads
        eos_token_id, bos_token_id = eos[0], tok.bos_token_id
        tokens = vocab.tokens
        special_token_ids = sorted(vocab.special_ids)

        def __call__(self, s: str) -> list[int]:
            return tok.encode(s, add_special_tokens=False)

    lltok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()), n_vocab=len(vocab.tokens), eos_token=eos)
    setup = _ms(t0)
    out = {}
    for name, (schema, instance) in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema if schema is not None else {"type": "object"}), defaults={"whitespace_flexible": True}
        )
        matcher = llg.LLMatcher(lltok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        compile_ms = _ms(t0)
        mask = llnp.allocate_token_bitmask(1, len(vocab.tokens))
        steps = []
        for t in tok.encode(json.dumps(instance), add_special_tokens=False) + eos[:1]:
            t0 = time.perf_counter()
            llnp.fill_next_token_bitmask(matcher, mask)
            steps.append(_ms(t0))
            assert matcher.consume_token(t), f"llguidance refused token {t} of a valid {name} instance"
        out[name] = (compile_ms, steps)
    return setup, out


def _row(label: str, lib: str, setup: float, name: str, compile_ms: float, steps: list[float]) -> str:
    return (
        f"| {label} | {lib} | {setup:.0f} | {name} | {compile_ms:.1f} | {len(steps)} | "
        f"{statistics.median(steps):.3f} | {float(np.percentile(steps, 99)):.3f} | {max(steps):.3f} |"
    )


def bench_apply(vocab: int, rows: int, repeat: int = 50) -> list[float]:
    """Milliseconds of ``kernels.bitmask.apply_token_bitmask_`` on ``rows`` constrained rows of a batch of 8."""
    import torch

    from kernels.bitmask import apply_token_bitmask_

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, vocab, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (rows, (vocab + 31) // 32), generator=gen, dtype=torch.int64)
    bitmask, which = words.to(torch.int32), torch.arange(rows)
    times = []
    for _ in range(repeat):
        batch = logits.clone()
        t0 = time.perf_counter()
        apply_token_bitmask_(batch, bitmask, which)
        times.append(_ms(t0))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", action="append", help="a tokenizer path or mistral-common:<file> (repeatable)")
    args = p.parse_args()
    names = args.tokenizer or [default_model_path(), "mistral-common:tekken_240911.json"]
    print("| tokenizer | engine | setup ms | schema | compile ms | steps | mask p50 ms | mask p99 ms | mask max ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        tok = load_tokenizer(resolve_tokenizer_path(name))
        label = f"{name.rsplit('/', 1)[-1]} ({tok.vocab_size})"
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            setup, results = fn(tok, eos)
            for schema, (compile_ms, steps) in results.items():
                print(_row(label, lib, setup, schema, compile_ms, steps), flush=True)
    print("\n| vocab | constrained rows of 8 | apply p50 ms | apply p90 ms |\n|---|---|---|---|")
    for vocab in (49152, 131072):
        for rows in (1, 8):
            times = sorted(bench_apply(vocab, rows))
            print(f"| {vocab} | {rows} | {statistics.median(times):.3f} | {times[len(times) * 9 // 10]:.3f} |")


if __name__ == "__main__":
    main()
