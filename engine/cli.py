"""``levante`` command line: generate, models, bench, bench-long.

Bad arguments and bad model folders end in one clear line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.config import EFFORTS

if TYPE_CHECKING:
    from engine.types import Prompt


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream an answer from a model (the embedded default unless --model)")
    p.add_argument("prompt", nargs="?", default=None, help="the question (or --prompt-ids)")
    p.add_argument(
        "--prompt-ids",
        type=_token_ids,
        default=None,
        metavar="1,2,3",
        help="send these token ids as the prompt (for a model without a tokenizer)",
    )
    p.add_argument("--model", default=None, help="HF folder (config.json + safetensors) or .gguf file")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder, or mistral-common:<file>")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--reasoning-effort", choices=EFFORTS, default=None)
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.set_defaults(func=_cmd_generate)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="model utilities")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    t = msub.add_parser("make-tiny", help="write a random tiny checkpoint for tests and benchmarks")
    t.add_argument("--arch", choices=("mistral", "mixtral", "mistral4"), required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="copy this tokenizer (a file or folder, or mistral-common:<file>) beside the weights and "
        "size the vocabulary to it, so `levante generate --model OUT` takes text",
    )
    t.set_defaults(func=_cmd_make_tiny)
    d = msub.add_parser("default", help="print the embedded default model's folder (converting it on first use)")
    d.set_defaults(func=_cmd_default)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="backends (native engine, vLLM, transformers generate) on the same model and prompts"
    )
    p.add_argument("--model", default=None)
    p.add_argument(
        "--backend",
        default="native,transformers",
        help="comma list of native, native-int8, native-int4 (model.quantization), vllm, transformers; "
        "ratios and agreement are against the first",
    )
    p.add_argument(
        "--vllm-eager",
        action="store_true",
        help="run vLLM without torch.compile (enforce_eager: faster start); default: vLLM's compiled mode",
    )
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=_cmd_bench)


def _add_bench_long(sub) -> None:
    from engine.config import ATTENTION_BACKENDS

    p = sub.add_parser(
        "bench-long", help="one long prompt: attention before tiling against the tiled path (time, peak RSS, KV)"
    )
    p.add_argument("--model", default=None, help="default: the tiny Mistral 4 with positions for the longest run")
    p.add_argument("--lengths", default="65536,262144", help="comma list of prompt lengths in tokens")
    p.add_argument("--max-tokens", type=int, default=8, help="greedy tokens after each prompt")
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step (scheduler.max_num_batched_tokens)")
    p.add_argument(
        "--old-backend",
        choices=ATTENTION_BACKENDS,
        default="cpu_untiled",
        help="the path before tiling (default); 'reference', the spec, gathers position by position in Python",
    )
    p.add_argument("--new-backend", choices=ATTENTION_BACKENDS, default="cpu", help="the tiled path (default)")
    p.add_argument(
        "--old-up-to", type=int, default=65536, help="run the old backend only at lengths up to this (it is slow)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per run; default: torch's")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=_cmd_bench_long)


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r}") from None
    if any(t < 0 for t in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


def _generate_prompt(args, llm) -> Prompt:
    """What to send: the token ids given, else the text (a chat turn unless --raw)."""
    if args.prompt_ids is not None:
        return args.prompt_ids
    if llm.tokenizer is None:
        raise ValueError(
            "prompt: this model has no tokenizer; send token ids with --prompt-ids 1,2,3, give "
            "--tokenizer, or make it with `levante models make-tiny --tokenizer ...`"
        )
    return args.prompt if args.raw else [{"role": "user", "content": args.prompt}]


def _cmd_generate(args) -> int:
    from engine.core.request import SamplingParams
    from engine.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        reasoning_effort=args.reasoning_effort,
    )
    if (args.prompt is None) == (args.prompt_ids is None):  # before the model loads
        raise ValueError("prompt: give either a prompt or --prompt-ids")
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype)
    prompt = _generate_prompt(args, llm)
    ids_only = llm.tokenizer is None  # nothing to decode with: print the token ids
    tty = sys.stdout.isatty()
    dim, reset = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    thinking = False
    final = None
    for d in llm.stream(prompt, params):
        if d.reasoning_text:
            if not thinking:
                print(f"{dim}[thinking] ", end="")
                thinking = True
            print(f"{dim}{d.reasoning_text}", end="", flush=True)
        if d.text:
            if thinking:
                print(f"{reset}\n[answer] ", end="")
                thinking = False
            print(d.text, end="", flush=True)
        if ids_only and d.token_ids:
            print(" ".join(map(str, d.token_ids)), end=" ", flush=True)
        final = d
    print(reset)
    if final and final.usage:
        u = final.usage
        print(
            f"[{final.finish_reason}; prompt {u.prompt_tokens} tokens, completion {u.completion_tokens}, "
            f"reasoning {u.reasoning_tokens}, effort {u.reasoning_effort}]",
            file=sys.stderr,
        )
    return 0


def _cmd_make_tiny(args) -> int:
    from engine.checkpoint.tiny import make_tiny, make_tiny_with_tokenizer

    if args.tokenizer:
        print(make_tiny_with_tokenizer(args.arch, args.seed, args.out, args.tokenizer))
    else:
        print(make_tiny(args.arch, args.seed, args.out))
    return 0


def _cmd_default(args) -> int:
    from engine.checkpoint.gguf import default_model_path

    print(default_model_path())
    return 0


def _cmd_bench(args) -> int:
    from engine.bench import run

    return run(args)


def _cmd_bench_long(args) -> int:
    from engine.bench_long import run

    return run(args)


def add_commands(sub) -> None:
    """The engine's subcommands; ``cluster.cli`` adds the serving ones beside them."""
    _add_generate(sub)
    _add_models(sub)
    _add_bench(sub)
    _add_bench_long(sub)


def run(args, errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a parsed command: bad input ends in one ``levante: error:`` line and exit code 2."""
    from engine.types import EngineError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (EngineError, ValueError, OSError, *errors) as e:  # ModelLoadError is a ValueError
        print(f"levante: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="levante", description="Levante: serve Mistral-family MoE models")
    add_commands(parser.add_subparsers(dest="cmd", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
