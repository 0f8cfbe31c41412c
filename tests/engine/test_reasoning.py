import pytest

from engine.config import ReasoningConfig
from engine.reasoning import ANSWER, MARKER, REASONING, ReasoningState, ThinkMarkers, resolve_markers

ONE = ThinkMarkers((5,), (6,))  # Mistral style: one special token each
MULTI = ThinkMarkers((7, 8), (7, 9))  # text markers such as "<think>" spanning tokens


def run(state, sampled):
    """Drive the state like the engine does: emit (forced or sampled), then feed."""
    emitted, released = [], []
    for s in sampled:
        tok = state.next_token(s)
        emitted.append(tok)
        released += state.feed(tok)
    return emitted, released + state.flush()


def test_none_bans_single_token_start_and_never_thinks():
    st = ReasoningState(ONE, "none", 100, [1, 2])
    assert st.banned_token_ids() == (5,)
    emitted, rel = run(st, [10, 11])
    assert emitted == [10, 11] and all(ch == ANSWER for _, ch in rel)
    assert st.num_reasoning_tokens == 0


def test_none_closes_a_span_the_model_opens_anyway():
    st = ReasoningState(MULTI, "none", 100, [1])
    assert st.banned_token_ids() == ()  # cannot ban half of a text marker
    emitted, rel = run(st, [7, 8, 20, 21, 22])
    assert emitted == [7, 8, 7, 9, 22]  # opened, immediately closed by the engine, then the answer
    assert [ch for _, ch in rel] == [MARKER, MARKER, MARKER, MARKER, ANSWER]


def test_budget_forces_end_marker():
    st = ReasoningState(ONE, "low", 3, [1])
    emitted, rel = run(st, [99, 20, 21, 22, 23, 30, 31])
    # forced start, 3 thinking tokens, forced end, then answer tokens
    assert emitted == [5, 20, 21, 22, 6, 30, 31]
    assert [t for t, ch in rel if ch == REASONING] == [20, 21, 22]
    assert [t for t, ch in rel if ch == ANSWER] == [30, 31]
    assert st.num_reasoning_tokens == 3


def test_model_closes_before_budget():
    st = ReasoningState(ONE, "high", 100, [1, 5])  # prompt already opened the span
    emitted, rel = run(st, [20, 6, 30])
    assert emitted == [20, 6, 30]
    assert [ch for _, ch in rel] == [REASONING, MARKER, ANSWER]


def test_multi_token_marker_prefix_held_back_then_released():
    st = ReasoningState(MULTI, "high", 100, [1, 7, 8])
    # 7 starts the end marker "7 9" but 7 10 is not it: both are reasoning
    _emitted, rel = run(st, [7, 10, 7, 9, 30])
    assert [(t, ch) for t, ch in rel] == [(7, REASONING), (10, REASONING), (7, MARKER), (9, MARKER), (30, ANSWER)]


def test_resolve_markers_prefers_explicit_ids_then_special_tokens():
    cfg = ReasoningConfig(think_start_ids=(3,), think_end_ids=(4,))
    assert resolve_markers(None, cfg) == ThinkMarkers((3,), (4,))
    assert resolve_markers(None, ReasoningConfig()) == ThinkMarkers((), ())


def test_bad_effort_rejected():
    with pytest.raises(ValueError, match="reasoning_effort"):
        ReasoningState(ONE, "extreme", 1, [1])


def test_end_of_text_inside_span_closes_it_instead():
    st = ReasoningState(ONE, "high", 100, [1], eos_ids=frozenset({2}))
    emitted, rel = run(st, [0, 20, 2, 30, 2])
    assert emitted == [5, 20, 6, 30, 2]  # eos while thinking became the end marker; eos in the answer stays
    assert [ch for _, ch in rel] == [MARKER, REASONING, MARKER, ANSWER, ANSWER]


def _admission(reasoning: ReasoningConfig = ReasoningConfig()):
    from engine.admission import Admission

    return Admission(None, 512, [2], ONE, reasoning, 4096)


@pytest.mark.parametrize(
    ("max_tokens", "thinking_budget", "want"),
    [
        (64, None, 32),  # the effort's 128 would take every token: half is left for the answer
        (128, None, 64),
        (1000, None, 128),  # room enough: the effort's budget as configured
        (8, 100, 4),  # an explicit budget is capped too
        (1000, 10, 10),
    ],
)
def test_admission_leaves_half_of_max_tokens_for_the_answer(max_tokens, thinking_budget, want):
    from engine.core.request import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, reasoning_effort="low", thinking_budget=thinking_budget)
    admitted = _admission().admit("r", [1, 3, 4], params, None)
    assert admitted.thinking_budget == want and admitted.state.reasoning.budget == want
