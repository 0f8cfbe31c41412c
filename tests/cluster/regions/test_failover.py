"""FailoverBackend against scripted backends: retry, resume, spill, timeouts, no bouncing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from cluster.backends.failover import FailoverBackend
from cluster.chunks import error_chunk
from cluster.config import HealthCheckConfig, RegionsConfig
from cluster.regions.codes import fails_over, from_grpc
from cluster.regions.health_book import EJECTED, HealthBook
from cluster.types import (
    DEADLINE_EXCEEDED,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    Backend,
    Chunk,
    ChunkError,
    Decision,
    FailoverHop,
    GenerateRequest,
    ModelInfo,
    ServedBy,
)
from engine.types import Resume, SamplingParams

# The request's own fault: every region would refuse it the same way (cluster/regions/codes.py).
CALLER_ERRORS = frozenset({UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND})

HEALTH = HealthCheckConfig(consecutive_failures=1, stream_idle_timeout_s=0.3)


class Scripted(Backend):
    """Plays one script per call: chunks, ("sleep", s) pauses, and "hang" (waits forever)."""

    def __init__(self, name: str, *scripts: list):
        self.name, self.scripts, self.requests, self.closed = name, list(scripts), [], 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        script = self.scripts.pop(0)
        try:
            for step in script:
                if step == "hang":
                    await asyncio.Event().wait()
                if isinstance(step, tuple):
                    await asyncio.sleep(step[1])
                    continue
                yield step
        finally:
            self.closed += 1

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo("m", 64)]

    async def ready(self) -> bool:
        return True


def tokens(*ids: int, region: str = "", final: bool = False) -> Chunk:
    c = Chunk(token_ids=list(ids), text="".join(f"<{i}>" for i in ids))
    if final:
        c.finished, c.finish_reason, c.served_by = True, "length", ServedBy(region, "r0")
    return c


def start() -> Chunk:
    return Chunk(decision=Decision("low", "auto: test"))


def backend(members: dict, local: str | None = "eu", **cfg) -> FailoverBackend:
    book = HealthBook(HEALTH, members, local=local)
    return FailoverBackend(members, book, RegionsConfig(health=HEALTH, **cfg), local=local)


def request(**kw) -> GenerateRequest:
    params = kw.pop("params", SamplingParams(max_tokens=6, temperature=1.0))
    return GenerateRequest("t/1", "m", "hi", params, **kw)


def run(fb: FailoverBackend, req: GenerateRequest) -> list[Chunk]:
    async def collect():
        return [c async for c in fb.generate(req)]

    return asyncio.run(collect())


def test_a_stream_broken_mid_way_resumes_elsewhere_with_nothing_lost_or_repeated():
    eu = Scripted("eu", [start(), tokens(1, 2), tokens(3), error_chunk(UNAVAILABLE, "replica", "lost")])
    us = Scripted("us", [start(), tokens(4, 5), tokens(6, region="us", final=True)])
    chunks = run(backend({"eu": eu, "us": us}), request())
    assert [t for c in chunks for t in c.token_ids] == [1, 2, 3, 4, 5, 6]
    resumed = us.requests[0]
    assert resumed.resume.token_ids == (1, 2, 3) and resumed.resume.text_chars == len("<1><2><3>")
    assert resumed.reasoning_effort == "low"  # the first region's decision, not a new one
    assert resumed.params.seed is not None and resumed.params.seed == eu.requests[0].params.seed  # same seed
    assert {c.decision.reason for c in chunks if c.decision is not None} == {"auto: test"}  # the first decision
    final = chunks[-1]
    assert final.served_by.region == "us"
    assert [(h.from_region, h.at_token) for h in final.failovers] == [("eu", 3)]
    assert final.failovers[0].reason == "unavailable: lost"


def replaying(members: dict) -> FailoverBackend:
    """As the client library without a peer key: no `resume`, the next region replays the stream."""
    book = HealthBook(HEALTH, members)
    return FailoverBackend(members, book, RegionsConfig(health=HEALTH), local=None, by_latency=False, replay=True)


def test_without_the_peer_role_a_broken_stream_is_replayed_and_what_the_caller_has_is_dropped():
    eu = Scripted("eu", [start(), tokens(1, 2), tokens(3), error_chunk(UNAVAILABLE, "replica", "lost")])
    us = Scripted("us", [start(), tokens(1, 2), tokens(3, 4), tokens(5, 6, region="us", final=True)])
    chunks = run(replaying({"eu": eu, "us": us}), request())
    assert [t for c in chunks for t in c.token_ids] == [1, 2, 3, 4, 5, 6]
    assert "".join(c.text for c in chunks) == "".join(f"<{i}>" for i in range(1, 7))
    replayed = us.requests[0]
    assert replayed.resume is None  # nothing a region must take on trust
    assert replayed.reasoning_effort == "low" and replayed.params.seed == eu.requests[0].params.seed
    assert [(h.from_region, h.at_token) for h in chunks[-1].failovers] == [("eu", 3)]


def test_a_replay_that_differs_from_what_the_caller_has_ends_the_stream_with_failed_precondition():
    eu = Scripted("eu", [start(), tokens(1, 2), error_chunk(UNAVAILABLE, "replica", "lost")])
    us = Scripted("us", [start(), tokens(1, 9), tokens(3, region="us", final=True)])
    chunks = run(replaying({"eu": eu, "us": us}), request())
    assert [t for c in chunks for t in c.token_ids] == [1, 2]  # nothing of the differing replay
    error = chunks[-1].error
    assert error.code == FAILED_PRECONDITION and error.field == "resume" and "at token 1" in error.message


def test_a_region_that_fails_before_starting_is_retried_and_ejected():
    eu = Scripted("eu", [error_chunk(UNAVAILABLE, "region", "eu: connection refused")])
    us = Scripted("us", [start(), tokens(1, region="us", final=True)])
    fb = backend({"eu": eu, "us": us})
    chunks = run(fb, request())
    assert chunks[-1].failovers[0].at_token == 0 and us.requests[0].resume is None
    assert fb.book.regions["eu"].state(fb.book.clock()) == EJECTED  # consecutive_failures=1 in this test
    assert fb.order(None) == ["us", "eu"]  # the ejected local region goes last


def test_greedy_and_seeded_requests_keep_their_seed():
    greedy = Scripted("eu", [tokens(1, final=True)])
    run(backend({"eu": greedy}), request(params=SamplingParams(temperature=0.0)))
    assert greedy.requests[0].params.seed is None  # greedy needs none
    seeded = Scripted("eu", [tokens(1, final=True)])
    run(backend({"eu": seeded}), request(params=SamplingParams(temperature=1.0, seed=7)))
    assert seeded.requests[0].params.seed == 7


def test_overload_spills_to_a_peer_and_is_returned_only_when_every_region_is_full():
    full = lambda name: Scripted(name, [error_chunk(RESOURCE_EXHAUSTED, "queue", "full")])
    us = Scripted("us", [tokens(1, region="us", final=True)])
    fb = backend({"eu": full("eu"), "us": us})
    assert run(fb, request())[-1].served_by.region == "us"
    assert fb.book.available("eu")  # busy is not sick: no ejection
    chunks = run(backend({"eu": full("eu"), "us": full("us")}), request())
    assert chunks[-1].error.code == RESOURCE_EXHAUSTED and "every region is full" in chunks[-1].error.message
    no_spill = backend({"eu": full("eu"), "us": Scripted("us")}, spill_on_overload=False)
    assert run(no_spill, request())[-1].error.code == RESOURCE_EXHAUSTED


def test_a_bad_request_is_not_retried():
    eu = Scripted("eu", [error_chunk(INVALID_ARGUMENT, "max_tokens", "too many")])
    us = Scripted("us")
    chunks = run(backend({"eu": eu, "us": us}), request())
    assert chunks[-1].error.field == "max_tokens" and us.requests == []


@pytest.mark.parametrize("code", sorted(CALLER_ERRORS))
def test_a_refusal_reaches_the_caller_as_itself_and_no_other_region_is_asked(code):
    refusal = Chunk(finished=True, error=ChunkError(code, "", "authorization: unknown API key", origin="eu"))
    eu, us = Scripted("eu", [refusal]), Scripted("us", [tokens(1, region="us", final=True)])
    fb = backend({"eu": eu, "us": us})
    err = run(fb, request())[-1].error
    assert (err.code, err.origin, err.message) == (code, "eu", "authorization: unknown API key")
    assert us.requests == [] and fb.book.available("eu")  # the caller's fault: the region is not sick


def test_the_rule_fails_over_only_what_another_region_could_serve():
    assert fails_over(UNAVAILABLE) and fails_over(RESOURCE_EXHAUSTED) and not fails_over(RESOURCE_EXHAUSTED, False)
    assert not any(fails_over(code) for code in (*CALLER_ERRORS, DEADLINE_EXCEEDED))
    assert {c: from_grpc(getattr(grpc.StatusCode, c.upper())) for c in CALLER_ERRORS} == {c: c for c in CALLER_ERRORS}
    assert from_grpc(grpc.StatusCode.CANCELLED) == from_grpc(grpc.StatusCode.INTERNAL) == UNAVAILABLE


def test_silence_fails_over_by_timeout_and_closes_the_silent_stream():
    eu = Scripted("eu", [start(), "hang"])  # accepted, then nothing: a frozen region
    us = Scripted("us", [tokens(1, region="us", final=True)])
    fb = backend({"eu": eu, "us": us})
    chunks = run(fb, request())
    hop = chunks[-1].failovers[0]
    assert hop.reason == "timeout: no chunk or heartbeat within 0.3s" and eu.closed == 1
    assert not fb.book.available("eu")  # silence is the liveness test: the region is ejected
    mid = Scripted("eu", [tokens(1), "hang"])
    chunks = run(backend({"eu": mid, "us": Scripted("us", [tokens(2, region="us", final=True)])}), request())
    assert chunks[-1].failovers[0].reason == "timeout: no chunk or heartbeat within 0.3s"
    assert [t for c in chunks for t in c.token_ids] == [1, 2]


def heartbeats(seconds: float, every: float = 0.1) -> list:
    return [step for _ in range(round(seconds / every)) for step in (("sleep", every), Chunk())]


def test_a_first_token_long_after_the_idle_limit_is_fine_while_heartbeats_flow():
    # 1.2s to the first token: four times the idle limit, with a heartbeat every 0.1s
    eu = Scripted("eu", [start(), *heartbeats(1.2), tokens(1), *heartbeats(0.6), tokens(2, region="eu", final=True)])
    us = Scripted("us")
    fb = backend({"eu": eu, "us": us})
    chunks = run(fb, request())
    assert chunks[-1].served_by.region == "eu" and chunks[-1].failovers is None and chunks[-1].error is None
    assert us.requests == [] and fb.book.available("eu") and fb.book.regions["eu"].ejections == 0


# the checks judge a region down after two failures; the idle limit alone would wait 30s
JUDGED = HealthCheckConfig(timeout_s=0.1, unhealthy_threshold=2, stream_idle_timeout_s=30.0)


def judged_down_after(fb: FailoverBackend, region: str, seconds: float, req: GenerateRequest) -> list[Chunk]:
    """Runs ``req`` while the checks fail ``region`` twice, ``seconds`` in."""

    async def go():
        async def checks_fail():
            await asyncio.sleep(seconds)
            fb.book.on_check(region, False, reason="timeout: no health answer")
            fb.book.on_check(region, False, reason="timeout: no health answer")

        failing = asyncio.create_task(checks_fail())
        chunks = [c async for c in fb.generate(req)]
        await failing
        return chunks

    return asyncio.run(go())


def judged(members: dict, **kw) -> FailoverBackend:
    return FailoverBackend(members, HealthBook(JUDGED, members), RegionsConfig(health=JUDGED), **kw)


def test_a_stream_in_a_region_its_checks_call_down_leaves_without_waiting_out_the_idle_limit():
    eu = Scripted("eu", [start(), tokens(1), "hang"])  # frozen after one token
    us = Scripted("us", [tokens(2, region="us", final=True)])
    chunks = judged_down_after(judged({"eu": eu, "us": us}, local=None, by_latency=False), "eu", 0.3, request())
    hop = chunks[-1].failovers[0]
    assert hop.reason.startswith("unhealthy: timeout: no health answer (2 failed checks in a row)"), hop.reason
    assert [t for c in chunks for t in c.token_ids] == [1, 2] and eu.closed == 1


def test_a_region_called_down_keeps_a_stream_that_still_flows_and_the_last_region_keeps_a_silent_one():
    # chunks every 0.05s, within the 0.2s a judged region's stream may stay silent: it runs to its end
    eu = Scripted("eu", [start(), *heartbeats(0.6, every=0.05), tokens(1, region="eu", final=True)])
    fb = judged({"eu": eu, "us": Scripted("us")}, local=None, by_latency=False)
    chunks = judged_down_after(fb, "eu", 0.1, request())
    assert chunks[-1].served_by.region == "eu" and chunks[-1].failovers is None
    # nowhere else to go (us is down too): a silent stream gets the whole idle limit, not the short one
    eu = Scripted("eu", [start(), ("sleep", 0.6), tokens(1, region="eu", final=True)])
    fb = judged({"eu": eu, "us": Scripted("us")}, local=None, by_latency=False)
    fb.book.on_check("us", False)
    fb.book.on_check("us", False)
    chunks = judged_down_after(fb, "eu", 0.1, request())
    assert chunks[-1].served_by.region == "eu" and chunks[-1].failovers is None


def test_the_tenants_first_token_limit_ends_the_request_and_blames_no_region():
    eu = Scripted("eu", [start(), *heartbeats(2.0)])
    us = Scripted("us")
    fb = backend({"eu": eu, "us": us})
    chunks = run(fb, request(first_token_timeout_s=0.5))
    err = chunks[-1].error
    assert err.code == "deadline_exceeded" and err.field == "first_token_timeout_s" and "within 0.5s" in err.message
    assert us.requests == [] and eu.closed == 1  # no other region tried; the stream was closed (engine aborted)
    assert fb.book.available("eu") and fb.book.regions["eu"].ejections == 0
    # once the first token came, the limit is met: a long answer is not cut
    eu = Scripted("eu", [start(), tokens(1), *heartbeats(0.8), tokens(2, region="eu", final=True)])
    chunks = run(backend({"eu": eu, "us": Scripted("us")}), request(first_token_timeout_s=0.5))
    assert chunks[-1].error is None and [t for c in chunks for t in c.token_ids] == [1, 2]


def test_a_forwarded_request_whose_region_goes_silent_fails_within_the_idle_limit():
    eu = Scripted("eu", [start(), "hang"])
    us = Scripted("us")
    chunks = run(backend({"eu": eu, "us": us}), request(forwarded_from="us"))
    err = chunks[-1].error
    assert err.code == UNAVAILABLE and "timeout: no chunk or heartbeat within 0.3s" in err.message
    assert us.requests == [] and eu.closed == 1


def test_a_forwarded_request_is_served_locally_or_fails_without_bouncing():
    eu = Scripted("eu", [error_chunk(UNAVAILABLE, "replica", "lost")])
    us = Scripted("us")
    chunks = run(backend({"eu": eu, "us": us}), request(forwarded_from="us"))
    assert chunks[-1].error.code == UNAVAILABLE and us.requests == []


def test_every_region_failing_names_each_and_why():
    eu = Scripted("eu", [error_chunk(UNAVAILABLE, "region", "refused")])
    us = Scripted("us", [error_chunk(UNAVAILABLE, "region", "reset")])
    err = run(backend({"eu": eu, "us": us}), request())[-1].error
    assert (
        err.code == UNAVAILABLE
        and "eu (unavailable: refused)" in err.message
        and "us (unavailable: reset)" in err.message
    )


def test_max_attempts_bounds_the_regions_tried():
    members = {n: Scripted(n, [error_chunk(UNAVAILABLE, "region", "down")]) for n in ("a", "b", "c")}
    run(backend(members, local="a", max_attempts=2), request())
    assert [len(m.requests) for m in members.values()] == [1, 1, 0]


def test_deadline_passing_ends_the_request_instead_of_failing_over():
    import time

    eu = Scripted("eu", [start(), "hang"])
    us = Scripted("us")
    chunks = run(backend({"eu": eu, "us": us}), request(deadline=time.time() + 0.1))
    assert chunks[-1].error.code == "deadline_exceeded" and us.requests == []


@pytest.mark.parametrize("local", [None, "eu"])
def test_ready_is_the_local_regions_or_any_for_a_client(local):
    fb = backend({"eu": Scripted("eu"), "us": Scripted("us")}, local=local)
    assert asyncio.run(fb.ready()) is True


def test_a_resumed_request_that_breaks_again_resumes_from_everything_sent():
    eu = Scripted("eu", [tokens(3), error_chunk(UNAVAILABLE, "replica", "lost")])
    us = Scripted("us", [tokens(4, region="us", final=True)])
    us.scripts[0][-1].failovers = [FailoverHop("x", "y", 1)]  # a hop the serving region made itself
    chunks = run(backend({"eu": eu, "us": us}), request(resume=Resume((1, 2), 5, 0)))
    assert us.requests[0].resume == Resume((1, 2, 3), 5 + len("<3>"), 0)
    assert [(h.from_region, h.at_token) for h in chunks[-1].failovers] == [("eu", 3), ("x", 1)]


def test_an_explicit_effort_leaves_the_region_capped_at_the_tenants_ceiling():
    from cluster.policy.effort import within_ceiling

    assert within_ceiling(request(reasoning_effort="high", max_effort="low")).reasoning_effort == "low"
    assert within_ceiling(request(reasoning_effort="none", max_effort="low")).reasoning_effort == "none"
    assert within_ceiling(request(reasoning_effort="auto", max_effort="low")).reasoning_effort == "auto"
