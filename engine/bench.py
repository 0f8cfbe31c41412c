"""``levante bench``: the engine and transformers ``generate`` on the same model and prompts.

Both run greedy decoding of the same random prompts in this one process,
one after the other, with the same torch thread count; the report gives
tokens/s for each, the ratio, and how many generated tokens agree.
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch

from engine.config import EngineConfig, ModelConfig, SchedulerConfig
from engine.core.request import SamplingParams


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def bench_engine(path: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from engine.llm import LLM

    cfg = EngineConfig(model=ModelConfig(model=path), scheduler=SchedulerConfig(max_num_seqs=max(len(prompts), 1)))
    llm = LLM(config=cfg)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, [o.token_ids for o in outs]


def bench_transformers(path: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kw = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, **kw)
        elapsed = time.perf_counter() - start
    return elapsed, out[:, ids.shape[1]:].tolist()


def run(args) -> int:
    from engine.models.loader import default_model_path, load_model

    path = args.model or default_model_path()
    _, hf_config = load_model(path, ModelConfig(model=path))
    prompts = _prompts(int(hf_config["vocab_size"]), args.num_prompts, args.prompt_len)
    n_tokens = args.num_prompts * args.max_tokens
    _log(f"model {path}; {args.num_prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} new tokens each; "
         f"torch threads {torch.get_num_threads()}")
    _log("running levante engine ...")
    t_engine, ours = bench_engine(path, prompts, args.max_tokens)
    _log("running transformers generate ...")
    t_hf, theirs = bench_transformers(path, prompts, args.max_tokens)
    agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / max(n_tokens, 1)
    result = {
        "model": path,
        "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "levante_tokens_per_s": n_tokens / t_engine,
        "transformers_tokens_per_s": n_tokens / t_hf,
        "ratio": t_hf / t_engine,
        "greedy_token_agreement": agree,
    }
    print(f"{'system':<24}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'levante engine':<24}{t_engine:>10.2f}{result['levante_tokens_per_s']:>12.1f}")
    print(f"{'transformers generate':<24}{t_hf:>10.2f}{result['transformers_tokens_per_s']:>12.1f}")
    print(f"ratio (levante / transformers tokens/s): {result['ratio']:.2f}x; greedy tokens agreeing: {agree:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
