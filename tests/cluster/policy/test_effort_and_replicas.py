"""Router policy: reasoning depth rules and replica choice, each with its reason text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.config import AutoEffortConfig
from cluster.policy.effort import decide_effort, find_keyword, render_prompt
from cluster.policy.replicas import (
    NoReplicaAvailable,
    PrefixAffinity,
    ReplicaLoad,
    prefix_key,
    ranked_replicas,
)

CFG = AutoEffortConfig()  # default none, keywords -> medium, >= 4000 chars -> low, deadlines 2/5/15 s, load 0.5/2 s


def decide(requested="auto", max_effort="high", text="hello", chars=None, deadline=None, queue=0.0, cfg=CFG):
    return decide_effort(requested, max_effort, text, len(text) if chars is None else chars, deadline, queue, cfg)


# -- decide_effort ---------------------------------------------------------------

EFFORT_CASES = [
    # (kwargs, effort, reason)
    ({}, "none", "auto: no reasoning cues -> none"),
    ({"text": "Please PROVE that 2 is prime"}, "medium", "auto: prompt asks for reasoning ('prove') -> medium"),
    ({"text": "think step  by\nstep"}, "medium", "auto: prompt asks for reasoning ('step by step') -> medium"),
    ({"text": "improve this reasonable text"}, "none", "auto: no reasoning cues -> none"),  # whole words only
    ({"chars": 5000}, "low", "auto: long prompt (5000 chars >= 4000) -> low"),
    ({"chars": 4000}, "low", "auto: long prompt (4000 chars >= 4000) -> low"),
    ({"chars": 3999}, "none", "auto: no reasoning cues -> none"),
    # the long-prompt rule only raises: medium from a keyword stays medium
    ({"text": "why?", "chars": 9000}, "medium", "auto: prompt asks for reasoning ('why') -> medium"),
    (
        {"text": "why?", "deadline": 4.0},
        "low",
        "auto: prompt asks for reasoning ('why') -> medium; deadline in 4.0s < 5s needed for medium -> low",
    ),
    (
        {"text": "why?", "deadline": 1.0},
        "none",
        "auto: prompt asks for reasoning ('why') -> medium; deadline in 1.0s < 5s needed for medium -> none",
    ),
    ({"text": "why?", "deadline": 5.0}, "medium", "auto: prompt asks for reasoning ('why') -> medium"),
    (
        {"text": "why?", "deadline": -1.0},
        "none",
        "auto: prompt asks for reasoning ('why') -> medium; deadline in -1.0s < 5s needed for medium -> none",
    ),
    (
        {"text": "why?", "queue": 0.8},
        "low",
        "auto: prompt asks for reasoning ('why') -> medium; queue delay 0.8s >= 0.5s -> low",
    ),
    (
        {"text": "why?", "queue": 0.5},
        "low",
        "auto: prompt asks for reasoning ('why') -> medium; queue delay 0.5s >= 0.5s -> low",
    ),
    ({"text": "why?", "queue": 0.49}, "medium", "auto: prompt asks for reasoning ('why') -> medium"),
    (
        {"text": "why?", "queue": 2.5},
        "none",
        "auto: prompt asks for reasoning ('why') -> medium; queue delay 2.5s >= 2s -> none",
    ),
    ({"queue": 5.0}, "none", "auto: no reasoning cues -> none"),  # nothing left to degrade
    # deadline first, then load: medium -> low (deadline) -> none (load)
    (
        {"text": "why?", "deadline": 3.0, "queue": 1.0},
        "none",
        (
            "auto: prompt asks for reasoning ('why') -> medium; deadline in 3.0s < 5s needed for medium -> low; "
            "queue delay 1.0s >= 0.5s -> none"
        ),
    ),
    (
        {"text": "why?", "max_effort": "low"},
        "low",
        "auto: prompt asks for reasoning ('why') -> medium; capped at tenant max_effort low",
    ),
    (
        {"text": "why?", "max_effort": "none"},
        "none",
        "auto: prompt asks for reasoning ('why') -> medium; capped at tenant max_effort none",
    ),
    # explicit efforts: honoured, capped, never degraded by deadline or load
    ({"requested": "high"}, "high", "requested high"),
    ({"requested": "high", "max_effort": "medium"}, "medium", "requested high; capped at tenant max_effort medium"),
    ({"requested": "low", "max_effort": "medium"}, "low", "requested low"),
    ({"requested": "high", "queue": 10.0, "deadline": 0.5}, "high", "requested high"),
    ({"requested": "none", "text": "prove it"}, "none", "requested none"),
]


@pytest.mark.parametrize("kwargs,effort,reason", EFFORT_CASES, ids=[c[2] for c in EFFORT_CASES])
def test_decide_effort(kwargs, effort, reason):
    decision = decide(**kwargs)
    assert (decision.effort, decision.reason) == (effort, reason)


def test_auto_rules_follow_the_config():
    cfg = AutoEffortConfig(
        default="low",
        keyword_effort="high",
        keywords=("tricky",),
        long_prompt_chars=10,
        long_prompt_effort="medium",
        min_deadline_s={"high": 30.0},
        degrade_queue_delay_s=1.0,
        none_queue_delay_s=3.0,
    )
    assert decide(cfg=cfg).reason == "auto: no reasoning cues -> low"
    assert decide(text="a tricky one", cfg=cfg).effort == "high"
    assert decide(text="why?", cfg=cfg).effort == "low"  # not a keyword of this config
    assert decide(text="long enough text", cfg=cfg).reason == "auto: long prompt (16 chars >= 10) -> medium"
    # efforts absent from min_deadline_s need no time: high steps down to medium and stops there
    assert decide(text="tricky", deadline=1.0, cfg=cfg).reason == (
        "auto: prompt asks for reasoning ('tricky') -> high; deadline in 1.0s < 30s needed for high -> medium"
    )
    assert decide(text="tricky", queue=0.9, cfg=cfg).effort == "high"
    assert decide(text="tricky", queue=1.0, cfg=cfg).effort == "medium"


@pytest.mark.parametrize(
    "requested,max_effort,field",
    [("max", "high", "reasoning_effort"), ("AUTO", "high", "reasoning_effort"), ("auto", "extreme", "max_effort")],
)
def test_decide_effort_rejects_unknown_efforts(requested, max_effort, field):
    with pytest.raises(ValueError, match=f"^{field}: must be one of"):
        decide(requested=requested, max_effort=max_effort)


@given(
    requested=st.sampled_from(["none", "low", "medium", "high", "auto"]),
    max_effort=st.sampled_from(["none", "low", "medium", "high"]),
    text=st.text(max_size=40),
    chars=st.integers(0, 10_000),
    deadline=st.none() | st.floats(-10, 100),
    queue=st.floats(0, 10),
)
def test_effort_never_exceeds_the_tenant_ceiling(requested, max_effort, text, chars, deadline, queue):
    order = ["none", "low", "medium", "high"]
    decision = decide(
        requested=requested, max_effort=max_effort, text=text, chars=chars, deadline=deadline, queue=queue
    )
    assert order.index(decision.effort) <= order.index(max_effort)
    if requested != "auto":
        assert decision.effort == order[min(order.index(requested), order.index(max_effort))]
    elif deadline is not None and decision.effort != "none":
        assert deadline >= CFG.min_deadline_s[decision.effort]  # what AUTO picks fits the deadline


def test_find_keyword_is_case_insensitive_whole_word_and_ordered():
    keywords = ("step by step", "why", "prove")
    assert find_keyword("Why? Prove it.", keywords) == "why"
    assert find_keyword("STEP BY STEP", keywords) == "step by step"
    assert find_keyword("stepbystep", keywords) is None
    assert find_keyword("whyever", keywords) is None
    assert find_keyword("(prove)", keywords) == "prove"
    assert find_keyword("", keywords) is None


# -- prefix keys -------------------------------------------------------------------


def test_prefix_key_hashes_only_the_prefix():
    assert prefix_key("a" * 10 + "X", 10) == prefix_key("a" * 10 + "Y", 10)
    assert prefix_key("a" * 9 + "X", 10) != prefix_key("a" * 9 + "Y", 10)
    assert len(prefix_key("hello", 10)) == 32  # 16-byte blake2b, hex


def test_prefix_key_of_each_prompt_kind():
    assert prefix_key("", 10) is None and prefix_key([], 10) is None
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_prompt(messages) == "system: be brief\nuser: hi"
    assert prefix_key(messages, 12) == prefix_key(messages[:1] + [{"role": "user", "content": "bye"}], 12)
    assert prefix_key(messages, 100) != prefix_key(messages[:1] + [{"role": "user", "content": "bye"}], 100)
    # token ids: about 4 characters per token, so prefix_chars=8 keeps 2 ids
    assert prefix_key([1, 2, 3], 8) == prefix_key([1, 2, 4], 8)
    assert prefix_key([1, 2, 3], 12) != prefix_key([1, 2, 4], 12)
    # a text and a token list never share a key, nor a text and the same text as a message
    assert prefix_key("1,2", 100) != prefix_key([1, 2], 100)
    assert prefix_key("user: hi", 100) != prefix_key([{"role": "user", "content": "hi"}], 100)
    assert render_prompt([5, 6]) == ""


# -- PrefixAffinity -----------------------------------------------------------------


def test_prefix_affinity_is_an_lru():
    affinity = PrefixAffinity(2)
    affinity.remember("a", "r1")
    affinity.remember("b", "r2")
    affinity.remember("a", "r3")  # refreshes "a"; "b" is now the oldest
    affinity.remember("c", "r1")
    assert (affinity.peek("a"), affinity.peek("b"), affinity.peek("c"), len(affinity)) == ("r3", None, "r1", 2)
    affinity.forget_replica("r1")
    assert (affinity.peek("c"), len(affinity)) == (None, 1)
    with pytest.raises(ValueError, match="^capacity: "):
        PrefixAffinity(0)


# -- choose_replica ------------------------------------------------------------------


def choose_replica(candidates, prefix_key, affinity, slack):
    """What LevanteRequestRouter does with the ranking: the first one, remembered for the prefix."""
    replica_id, reason = ranked_replicas(candidates, prefix_key, affinity, slack)[0]
    if prefix_key is not None:
        affinity.remember(prefix_key, replica_id)
    return replica_id, reason


def loads(*specs: tuple[str, int] | tuple[str, int, bool]) -> list[ReplicaLoad]:
    return [ReplicaLoad(*s) for s in specs]


CHOICE_CASES = [
    # (candidates, remembered replica for "p", slack, chosen, reason)
    (loads(("r1", 3), ("r2", 1), ("r3", 2)), None, 4, "r2", "least outstanding: r2 (1 in flight)"),
    (
        loads(("r1", 3), ("r2", 1)),
        "r1",
        4,
        "r1",
        "prefix affinity: r1 served this prefix (3 in flight, least 1, slack 4)",
    ),
    (
        loads(("r1", 3), ("r2", 1)),
        "r1",
        2,
        "r1",
        "prefix affinity: r1 served this prefix (3 in flight, least 1, slack 2)",
    ),
    (
        loads(("r1", 3), ("r2", 1)),
        "r1",
        1,
        "r2",
        "least outstanding: r2 (1 in flight); prefix's replica r1 busy (3 > 1 + 1)",
    ),
    (
        loads(("r1", 0, False), ("r2", 5)),
        "r1",
        4,
        "r2",
        "least outstanding: r2 (5 in flight); prefix's replica r1 unavailable",
    ),
    (
        loads(("r1", 0), ("r2", 5)),
        "gone",
        4,
        "r1",
        "least outstanding: r1 (0 in flight); prefix's replica gone unavailable",
    ),
    (loads(("r1", 0, False), ("r2", 9), ("r3", 7, False)), None, 0, "r2", "least outstanding: r2 (9 in flight)"),
]


@pytest.mark.parametrize("candidates,remembered,slack,chosen,reason", CHOICE_CASES, ids=[c[4] for c in CHOICE_CASES])
def test_choose_replica(candidates, remembered, slack, chosen, reason):
    affinity = PrefixAffinity(8)
    if remembered:
        affinity.remember("p", remembered)
    assert choose_replica(candidates, "p", affinity, slack) == (chosen, reason)
    assert affinity.peek("p") == chosen  # the prefix now lives where it was sent


def test_choose_replica_without_prefix_key_remembers_nothing_and_breaks_ties_by_id():
    affinity = PrefixAffinity(8)
    assert choose_replica(loads(("b", 1), ("a", 1), ("c", 2)), None, affinity, 4) == (
        "a",
        "least outstanding: a (1 in flight)",
    )
    assert len(affinity) == 0


def test_ties_spread_across_prefixes_but_stay_stable_per_prefix():
    candidates = loads(("r1", 0), ("r2", 0), ("r3", 0), ("r4", 0))
    firsts = [ranked_replicas(candidates, prefix_key(f"prompt {i}", 64), PrefixAffinity(8), 0)[0][0] for i in range(40)]
    assert len(set(firsts)) > 1
    key = prefix_key("same prompt", 64)
    assert len({ranked_replicas(candidates, key, PrefixAffinity(8), 0)[0][0] for _ in range(5)}) == 1


def test_ranked_replicas_orders_all_healthy_by_preference_without_remembering():
    affinity = PrefixAffinity(8)
    affinity.remember("p", "r3")
    ranked = ranked_replicas(loads(("r1", 2), ("r2", 0), ("r3", 3), ("r4", 1, False)), "p", affinity, 4)
    assert [r for r, _ in ranked] == ["r3", "r2", "r1"]
    assert ranked[1][1] == "fallback: r2 (0 in flight)"
    affinity.remember("q", "r1")
    ranked_replicas(loads(("r2", 0)), "p", affinity, 4)
    assert affinity.peek("p") == "r3"
    affinity.remember("x", "r1")  # capacity is not the point; "p" must not have been refreshed by the peek above
    assert list(affinity._replica_of) == ["p", "q", "x"]


def test_no_healthy_replica():
    with pytest.raises(NoReplicaAvailable):
        choose_replica(loads(("r1", 0, False)), "p", PrefixAffinity(8), 4)
    with pytest.raises(NoReplicaAvailable):
        choose_replica([], None, PrefixAffinity(8), 4)


replica_loads = st.lists(
    st.builds(
        ReplicaLoad,
        replica_id=st.sampled_from([f"r{i}" for i in range(6)]),
        outstanding=st.integers(0, 50),
        healthy=st.booleans(),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda r: r.replica_id,
).filter(lambda rs: any(r.healthy for r in rs))


@given(
    candidates=replica_loads,
    remembered=st.none() | st.sampled_from([f"r{i}" for i in range(7)]),
    slack=st.integers(0, 100),
)
def test_choice_is_healthy_and_within_slack(candidates, remembered, slack):
    affinity = PrefixAffinity(4)
    if remembered:
        affinity.remember("p", remembered)
    chosen, _ = choose_replica(candidates, "p", affinity, slack)
    by_id = {c.replica_id: c for c in candidates}
    least = min(c.outstanding for c in candidates if c.healthy)
    assert by_id[chosen].healthy
    assert by_id[chosen].outstanding <= least + slack
    ranked = ranked_replicas(candidates, "p", PrefixAffinity(4), slack)
    assert sorted(r for r, _ in ranked) == sorted(c.replica_id for c in candidates if c.healthy)


@given(candidates=replica_loads, remembered=st.sampled_from([f"r{i}" for i in range(6)]))
def test_slack_zero_picks_least_outstanding_and_huge_slack_keeps_affinity(candidates, remembered):
    least = min(c.outstanding for c in candidates if c.healthy)
    strict = PrefixAffinity(4)
    strict.remember("p", remembered)
    chosen, _ = choose_replica(candidates, "p", strict, 0)
    assert {c.replica_id: c.outstanding for c in candidates}[chosen] == least

    sticky = PrefixAffinity(4)
    sticky.remember("p", remembered)
    chosen, reason = choose_replica(candidates, "p", sticky, 10_000)
    if any(c.replica_id == remembered and c.healthy for c in candidates):
        assert chosen == remembered and reason.startswith("prefix affinity")
    else:
        assert reason.startswith("least outstanding")
