"""Smoke test of ``levante bench-serving``: three paths, tiny numbers, a complete and sane result.

No timing assertions (the machine is shared); the real check is that greedy
decoding of the same prompts gives the same tokens on every path.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import tempfile

import pytest

from cluster.config_loader import config_from_dict
from cluster.ops.bench.serving import (
    METRICS,
    PATHS,
    BenchOptions,
    format_report,
    run_benchmark,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = {
    "region": "bench-test",
    "model_name": "tiny-moe",
    "engine": {
        "model": {
            "model": "tiny:mistral4?seed=0&vocab_size=32768",
            "tokenizer": "mistral-common:mistral_instruct_tokenizer_240323.model.v3",
            "num_threads": 1,
            "max_model_len": 512,
        },
        "cache": {"num_blocks": 64},
    },
    "replica": {"num_replicas": 1, "ep_size": 1, "rank_timeout_s": 30},
    "frontdoor": {"port": 0},
    "ray": {"num_cpus": 4},
}
OPTIONS = BenchOptions(num_requests=3, max_tokens=4, prompt_len=8, warmup=1, request_timeout_s=60)


def test_three_paths_give_the_same_greedy_tokens_and_every_figure():
    temp_dir = tempfile.mkdtemp(prefix="lvb-", dir="/tmp")  # ours, to check that its raylet is gone after
    cfg = config_from_dict(CONFIG, "test")
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, temp_dir=temp_dir))
    try:
        result = run_benchmark(cfg, OPTIONS, progress=lambda m: print(f"[bench] {m}"))
        raylets = subprocess.run(["pgrep", "-af", "raylet"], check=False, capture_output=True, text=True).stdout
        assert temp_dir not in raylets, "the benchmark left its Ray cluster running"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(format_report(result))

    (level,) = result["levels"]
    assert level["concurrency"] == 1
    reference = level["token_ids"]["in-process"]
    assert len(reference) == 3 and all(len(t) == 4 for t in reference)
    for name in PATHS:
        assert level["token_ids"][name] == reference, name
        assert level["same_tokens_as_in_process"][name] == 1.0
        s = level["paths"][name]
        assert s["requests"] == 3 and s["tokens"] == 12
        for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_per_s"):
            assert math.isfinite(s[key]) and s[key] > 0, (name, key, s[key])
        assert s["ttft_p50_ms"] <= s["ttft_p99_ms"] and s["itl_p50_ms"] <= s["itl_p99_ms"]
    assert set(level["ratios"]) == {"levante/in-process", "serve-proxy/in-process", "serve-proxy/levante"}
    for ratios in level["ratios"].values():
        assert all(math.isfinite(ratios[m]) and ratios[m] > 0 for m in METRICS)
