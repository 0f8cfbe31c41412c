"""``levante bench-long``: the CLI wiring on tiny lengths (each run is a fresh child process)."""

from __future__ import annotations

import json

import pytest

from engine import bench_long
from engine.cli import main


def test_lengths_parse_and_reject_bad_input():
    assert bench_long.parse_lengths("2048,65536") == [2048, 65536]
    for bad in ("", "1k", "0", "4096,1"):
        with pytest.raises(ValueError, match="--lengths"):
            bench_long.parse_lengths(bad)


def test_bench_long_runs_old_and_new_and_skips_old_above_the_limit(tmp_path, capsys):
    out = tmp_path / "long.json"
    args = ["--lengths", "600,700", "--old-up-to", "600", "--max-tokens", "2", "--chunk", "256", "--threads", "1"]
    assert main(["bench-long", *args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "700 cpu_untiled  skipped: above --old-up-to 600" in printed
    assert "600 speed-up" in printed and "tokens identical" in printed
    report = json.loads(out.read_text())
    runs = [(r["length"], r["backend"]) for r in report["runs"]]
    assert runs == [(600, "cpu_untiled"), (600, "cpu"), (700, "cpu")]
    assert "max_position_embeddings=766" in report["model"]  # positions for the longest run
    per_token = report["runs"][0]["kv_bytes"] / (-(-602 // 16) * 16)  # the tiny Mistral 4: 3 layers x (32 + 8) fp32
    assert per_token == 3 * 40 * 4
    for r in report["runs"]:
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 50 * 2**20 and len(r["tokens"]) == 2


def test_the_old_path_may_be_the_reference_backend(capsys):
    args = ["--lengths", "300", "--old-backend", "reference", "--max-tokens", "2", "--chunk", "128", "--threads", "1"]
    assert main(["bench-long", *args]) == 0
    printed = capsys.readouterr().out
    assert "300 reference" in printed and "300 speed-up" in printed
    assert "(reference / cpu); tokens identical" in printed


def test_a_failing_run_is_one_line_and_exit_2(capsys):
    assert main(["bench-long", "--model", "tiny:nosucharch", "--lengths", "64", "--old-up-to", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("levante: error: bench-long run cpu at 64 tokens failed:")
