"""``levante bench-long-doc`` without a cluster: its prompts, its report and its argument checks.

The cluster half (two questions through a region with two replicas) runs in
tests/cluster/serve/test_serve_cluster.py, on that module's region.
"""

from __future__ import annotations

import argparse

import pytest

from cluster.ops.bench import long_document
from cluster.ops.bench.long_document import DocOptions, prompts


def test_prompts_share_the_document_and_differ_in_the_question():
    opts = DocOptions(doc_tokens=100, question_tokens=5, seed=3, vocab_size=2000)
    first, second = prompts(opts)
    assert len(first) == len(second) == 105
    assert first[:100] == second[:100] and first[100:] != second[100:]
    assert all(1000 <= t < 2000 for t in first + second)
    assert prompts(opts) == (first, second)  # seeded


def _answer(ttft_s: float, replica: str, cached: int) -> dict:
    return {"ttft_s": ttft_s, "total_s": ttft_s + 1, "replica": replica, "prompt_tokens": 105, "cached_tokens": cached}


@pytest.mark.parametrize("second_replica, says", [("r1", "the same replica"), ("r2", "ANOTHER replica")])
def test_report_prints_both_ttfts_and_their_ratio(second_replica, says):
    result = {
        "options": {"doc_tokens": 100},
        "first": _answer(4.0, "r1", 0),
        "second": _answer(0.1, second_replica, 96),
    }
    report = long_document.format_report(result)
    assert "1 (cold)" in report and "4.000" in report and "0.100" in report
    assert f"TTFT ratio (question 1 / question 2): 40.0x; question 2 ran on {says}" in report


@pytest.mark.parametrize("flag, value", [("--doc-tokens", "0"), ("--max-tokens", "0"), ("--vocab-size", "1000")])
def test_bad_arguments_name_the_flag(flag, value):
    parser = argparse.ArgumentParser()
    long_document.add_arguments(parser)
    with pytest.raises(ValueError, match=flag):
        long_document.run(parser.parse_args([flag, value]))
