import pytest

from engine.core.request import MIN_TEMPERATURE, Request, RequestStatus, SamplingParams, finish_reason, is_finished


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens: must be >= 1, got 0"),
        ({"temperature": -0.1}, "temperature: must be >= 0"),
        ({"temperature": float("nan")}, "temperature: must be >= 0"),
        ({"top_k": -1}, "top_k: must be >= 0"),
        ({"top_p": 0.0}, "top_p: must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"min_p": -0.5}, "min_p: must be in [0, 1]"),
        ({"min_p": 1.1}, "min_p: must be in [0, 1]"),
        ({"seed": 1.5}, "seed: must be an int or None"),
        ({"stop": ["ok", ""]}, "stop: must be non-empty strings"),
        ({"stop_token_ids": [-1]}, "stop_token_ids: must be token ids >= 0"),
        ({"logprobs": -1}, "logprobs: must be >= 0 or None"),
        ({"prompt_logprobs": -2}, "prompt_logprobs: must be >= 0 or None"),
        ({"thinking_budget": -1}, "thinking_budget: must be >= 0 or None"),
        ({"reasoning_effort": "max"}, "reasoning_effort: must be one of"),
    ],
)
def test_sampling_params_validation_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(message)


def test_sampling_params_freezes_lists_and_greedy() -> None:
    sp = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4], temperature=0.0, reasoning_effort="high")
    assert sp.stop == ("a", "b") and sp.stop_token_ids == (3, 4)
    assert sp.greedy and not SamplingParams().greedy
    assert SamplingParams(stop="</s>").stop == ("</s>",)  # one string, not its characters
    hash(sp)  # frozen and hashable


def test_status_helpers() -> None:
    assert [finish_reason(s) for s in RequestStatus] == [None, None, None, "stop", "length", "abort"]
    assert [is_finished(s) for s in RequestStatus] == [False, False, False, True, True, True]


def test_request_tokens_append_in_place() -> None:
    r = Request("r", [5, 6, 7], eos_token_id=2)
    all_ids = r.all_token_ids
    r.append_output_token_ids(8)
    r.append_output_token_ids([9, 10])
    assert r.all_token_ids is all_ids and all_ids == [5, 6, 7, 8, 9, 10]
    assert (r.num_tokens, r.num_prompt_tokens, r.num_output_tokens) == (6, 3, 3)
    assert r.output_token_ids == [8, 9, 10] and r.prompt_token_ids == [5, 6, 7]
    assert r.status == RequestStatus.WAITING and not r.is_finished and r.finish_reason is None
    assert (r.num_computed_tokens, r.num_cached_tokens, r.num_preemptions, r.stop_reason) == (0, -1, 0, None)
    r.status = RequestStatus.FINISHED_LENGTH
    assert r.is_finished and r.finish_reason == "length"


def test_request_rejects_empty_prompt() -> None:
    with pytest.raises(ValueError, match="^prompt: must not be empty$"):
        Request("r", [])
    with pytest.raises(ValueError, match="^prompt: token ids"):
        Request("r", [1, -3])


def test_a_temperature_below_the_floor_is_greedy() -> None:
    for t in (1e-300, 5e-324, MIN_TEMPERATURE / 2):
        assert SamplingParams(temperature=t).greedy and SamplingParams(temperature=t).temperature == 0.0
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy  # the floor itself still samples


def test_a_bad_stop_or_stop_id_is_named_alone_not_echoed_with_all_the_others() -> None:
    with pytest.raises(ValueError) as e:
        SamplingParams(stop_token_ids=[1] * 299_999 + [-1])
    assert str(e.value) == "stop_token_ids: must be token ids >= 0, got -1 at index 299999"
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["s" * 900_000, ""])
    assert str(e.value) == "stop: must be non-empty strings, got '' at index 1"
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["ok", 7 * 10**100])  # type: ignore[list-item]
    assert len(str(e.value)) < 200  # a huge non-string is named by index too
