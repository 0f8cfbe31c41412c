"""The stop rules on their own: tokens, lengths, stop strings."""

from engine.core.request import SamplingParams
from engine.core.stop import Stop, check_token, find_stop_string, is_end_of_text, stop_string_hold, stop_token

EOS = 2


def test_stop_tokens_eos_first_then_stop_ids():
    params = SamplingParams(stop_token_ids=(2, 7))
    assert stop_token(EOS, params, EOS) == Stop("stop")  # end-of-text has no stop reason, even when listed
    assert stop_token(7, params, EOS) == Stop("stop", 7)
    assert stop_token(5, params, EOS) is None
    assert stop_token(EOS, SamplingParams(ignore_eos=True), EOS) is None
    assert stop_token(EOS, SamplingParams(ignore_eos=True, stop_token_ids=(2,)), EOS) == Stop("stop", 2)


def test_length_after_stop_tokens():
    params = SamplingParams(max_tokens=3)
    assert check_token(5, params, EOS, num_output_tokens=2, num_tokens=10, max_model_len=32) is None
    assert check_token(5, params, EOS, num_output_tokens=3, num_tokens=10, max_model_len=32) == Stop("length")
    assert check_token(5, params, EOS, num_output_tokens=1, num_tokens=32, max_model_len=32) == Stop("length")
    assert check_token(EOS, params, EOS, num_output_tokens=3, num_tokens=10, max_model_len=32) == Stop("stop")


def test_end_of_text_ignores_ignore_eos():
    assert is_end_of_text(2, frozenset({2, 9})) and is_end_of_text(9, [2, 9]) and not is_end_of_text(3, {2})


def test_stop_strings_cut_and_hold():
    assert stop_string_hold(()) == 0 and stop_string_hold(("ab", "wxyz")) == 3
    assert find_stop_string("one two three", ("two",), 0, include=False) == (4, "two")
    assert find_stop_string("one two three", ("two",), 0, include=True) == (7, "two")
    assert find_stop_string("one two three", ("two",), 8, include=False) is None  # searched when it came
    assert find_stop_string("one two three", ("four", "three"), 10, include=False) == (8, "three")
