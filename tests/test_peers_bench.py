"""benchmarks/peers.py: Levante's side run for real (each Levante variant in a subprocess of its own,
as a peer's venv runs), on a tiny Mixtral; the peers' own venvs are made only by a real benchmark run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "peers.py"
MODEL = "tiny:mixtral?seed=4&num_hidden_layers=1"


def load():
    spec = importlib.util.spec_from_file_location("peers_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_levante_fp32_and_int8_run_each_workload_and_report_agreement(tmp_path):
    out = tmp_path / "peers.json"
    args = ["--peers", "levante-int8", "--model", MODEL, "--prompts", "2", "--stream-prompts", "1"]
    args += ["--prompt-len", "8", "--max-tokens", "4", "--runs", "1", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    rows = {(r["peer"], r["workload"]): r for r in results}
    assert set(rows) == {(p, w) for p in ("levante", "levante-int8") for w in ("batch 2", "stream")}
    assert all(r["tokens_per_s"] > 0 for r in results)
    assert rows[("levante", "stream")]["agreement"] is None  # the reference itself
    assert 0.0 <= rows[("levante-int8", "batch 2")]["agreement"] <= 1.0
    assert "levante-int8" in proc.stdout and "Levante's ratio to each peer:" in proc.stdout


def test_ratios_pair_fp32_with_fp32_and_quantized_with_quantized():
    peers = load()
    r = lambda peer, workload, speed: peers.Result(peer, workload, 0, 1, speed, None, None)
    results = [r("levante", "stream", 20), r("levante-int4", "stream", 40), r("vllm-eager", "stream", 10)]
    results.append(r("llama.cpp", "stream", 32))
    assert peers.ratios(results) == ["levante / vllm-eager (stream): 2.00x", "levante-int4 / llama.cpp (stream): 1.25x"]


def test_an_unknown_peer_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        load().parse_args(["--peers", "levante,ollama"])
    assert "--peers: ollama is not one of" in capsys.readouterr().err


def test_a_peer_that_fails_is_reported_and_the_sitting_goes_on(tmp_path):
    peers = load()
    # a venv whose Python dies before printing a result, as llama.cpp's did on a CPU whose AMX tiles it could not use
    crash = tmp_path / "venvs" / "crash" / "bin"
    crash.mkdir(parents=True)
    (crash / "python").write_text("#!/bin/sh\nkill -SEGV $$\n")
    (crash / "python").chmod(0o755)
    broken = peers.Peer("llama.cpp", "llama.cpp", "crash")
    (tmp_path / "venvs" / "crash" / ".levante-peer").write_text(json.dumps([(), (), ()]))
    args = peers.parse_args(["--peers", "levante", "--model", MODEL, "--prompts", "2", "--stream-prompts", "1"])
    args.prompt_len, args.max_tokens, args.runs, args.venvs = 8, 4, 1, str(tmp_path / "venvs")
    results, failures = peers.run_all(args, [peers.PEERS["levante"], broken])
    assert {(r.peer, r.workload) for r in results} == {("levante", "batch 2"), ("levante", "stream")}
    assert len(failures) == 2 and all(f.startswith("llama.cpp, ") and "exited -11" in f for f in failures), failures
