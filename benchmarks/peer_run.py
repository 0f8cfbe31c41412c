"""One engine's timing, run by ``benchmarks/peers.py`` with the Python of that engine's own venv.

Reads a job (JSON) on stdin, loads the model, warms up, then times the job's prompts ``runs`` times
(greedy, ``max_tokens`` new tokens each, end-of-sequence ignored; prefix caching off, so a run after
the first computes its prompts again, as transformers and llama.cpp do) and prints the best run as one
line, ``peer-result: `` and JSON ``{"load_s", "seconds", "tokens", "perplexity"}``. Imports only its
engine's own package: vLLM, transformers and llama.cpp never see Levante's code.

Job keys: ``engine`` (levante, vllm, transformers, llama.cpp), ``model_dir`` (the fp32 Hugging Face
folder), ``gguf`` (the GGUF file, llama.cpp and Levante's quantized runs), ``prompts`` (token ids),
``batch`` (all prompts in one call, else one after the other), ``max_tokens``, ``threads``, ``runs``,
``quantization`` (Levante: none, int8, int4), ``eager`` (vLLM without torch.compile).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

Tokens = list[list[int]]
WARMUP_TOKENS = 4
MARK = "peer-result: "


def best_of(runs: int, generate: Callable[[Tokens, int], Tokens], job: dict) -> tuple[float, Tokens]:
    """The fastest of ``runs`` timed runs, after one short warm-up."""
    generate(job["prompts"][:1], WARMUP_TOKENS)
    best, tokens = float("inf"), []
    for _ in range(runs):
        start = time.perf_counter()
        if job["batch"]:
            tokens = generate(job["prompts"], job["max_tokens"])
        else:
            tokens = [generate([p], job["max_tokens"])[0] for p in job["prompts"]]
        best = min(best, time.perf_counter() - start)
    return best, tokens


def levante(job: dict) -> dict:
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from engine.core.request import SamplingParams
    from engine.llm import LLM
    from engine.quality import FIXED_TEXT, perplexity

    start = time.perf_counter()
    llm = LLM(
        config=EngineConfig(
            model=ModelConfig(
                model=job["gguf"] or job["model_dir"],  # the embedded model as it ships
                quantization=job["quantization"],
                num_threads=job["threads"],
            ),
            scheduler=SchedulerConfig(max_num_seqs=len(job["prompts"])),
            cache=CacheConfig(enable_prefix_caching=False),
        )
    )
    load_s = time.perf_counter() - start

    def generate(prompts: Tokens, n: int) -> Tokens:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return [list(o.token_ids) for o in outs]

    seconds, tokens = best_of(job["runs"], generate, job)
    ppl = None if llm.tokenizer is None else perplexity(llm.engine.model, llm.tokenizer.encode(FIXED_TEXT))
    return {"load_s": load_s, "seconds": seconds, "tokens": tokens, "perplexity": ppl}


def vllm(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=job["model_dir"],
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=job["eager"],
        max_num_seqs=len(job["prompts"]),
        max_model_len=len(job["prompts"][0]) + job["max_tokens"] + 16,
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=False,
        seed=0,
    )
    load_s = time.perf_counter() - start

    def generate(prompts: Tokens, n: int) -> Tokens:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    seconds, tokens = best_of(job["runs"], generate, job)
    return {"load_s": load_s, "seconds": seconds, "tokens": tokens, "perplexity": None}


def transformers(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - start

    def generate(prompts: Tokens, n: int) -> Tokens:
        ids = torch.tensor(prompts)  # equal lengths: no padding
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return out[:, ids.shape[1] :].tolist()

    seconds, tokens = best_of(job["runs"], generate, job)
    return {"load_s": load_s, "seconds": seconds, "tokens": tokens, "perplexity": None}


def llama_cpp(job: dict) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(
        model_path=job["gguf"],
        n_ctx=len(job["prompts"][0]) + job["max_tokens"] + 16,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        seed=0,
        verbose=False,
    )
    load_s = time.perf_counter() - start

    def generate(prompts: Tokens, n: int) -> Tokens:
        (prompt,) = prompts  # one stream at a time
        llm.reset()  # no prefix reuse from the run before
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # never stops at EOS itself
            out.append(token)
            if len(out) == n:
                break
        return [out]

    seconds, tokens = best_of(job["runs"], generate, job)
    return {"load_s": load_s, "seconds": seconds, "tokens": tokens, "perplexity": None}


ENGINES = {"levante": levante, "vllm": vllm, "transformers": transformers, "llama.cpp": llama_cpp}


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    result = ENGINES[job["engine"]](job)
    print(MARK + json.dumps(result), flush=True)  # marked: engines print on stdout too


if __name__ == "__main__":
    main()
