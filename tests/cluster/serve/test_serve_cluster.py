"""The whole region on one Ray cluster: gRPC front door (which routes) -> 2 replicas x 2 EP ranks.

One Ray cluster for the module (own temp dir, stopped at the end). The model
is a tiny Mistral 4 MoE with a real tokenizer, built from its config at start.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from ray import serve

from cluster.config_loader import config_from_dict
from cluster.ops.bench.long_document import DocOptions, ask, prompts
from cluster.serve.app import ENGINE_DEPLOYMENT, app_name
from engine.api import create_engine
from engine.types import SamplingParams
from levante.v1 import inference_pb2 as pb
from levante.v1 import inference_pb2_grpc as pb_grpc

from ..frontdoor.harness import generate, rpc_error, running_region, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

MODEL_URI = "tiny:mistral4?seed=0&vocab_size=32768"
TOKENIZER = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
CONFIG = {
    "region": "test-eu",
    "model_name": "tiny-moe",
    "engine": {
        "model": {"model": MODEL_URI, "tokenizer": TOKENIZER, "num_threads": 1, "max_model_len": 1024},
        "cache": {"num_blocks": 96},
        "reasoning": {"budget_low": 6},
    },
    "replica": {
        "num_replicas": 2,
        "ep_size": 2,
        "cpus_per_rank": 1,
        "max_ongoing_requests": 3,
        "max_queued_requests": 1,
        "stream_chunk_ms": 10,
        "rank_timeout_s": 20,
    },
    "router": {"replica_timeout_s": 60},
    "frontdoor": {"port": 0},
    "ray": {"num_cpus": 8},
}


@pytest.fixture(scope="module")
def region(loop):
    with running_region(loop, config_from_dict(CONFIG, "test")) as server:
        yield server


@pytest.fixture(scope="module")
def ch(region):
    with grpc.insecure_channel(f"127.0.0.1:{region.port}") as c:
        yield c


def replica_handle():
    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name(config_from_dict(CONFIG)))


def replica_statuses(loop, n: int = 2) -> dict[str, dict]:
    """Status of every replica (Serve routes each call to one; ask until all have answered)."""
    seen: dict[str, dict] = {}
    handle = replica_handle()
    for _ in range(50):
        s = loop.run(_call(handle.status.remote()))
        seen[s.replica] = s
        if len(seen) == n:
            break
    return seen


async def _call(response, timeout: float = 30.0):
    return await asyncio.wait_for(response, timeout)


def request(prompt_ids=None, text=None, **kw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(temperature=0.0, **kw)
    if prompt_ids is not None:
        req.prompt_token_ids.ids.extend(prompt_ids)
    elif text is not None:
        req.prompt = text
    return req


def final_of(responses) -> pb.Final:
    assert responses[-1].WhichOneof("kind") == "final"
    return responses[-1].final


def tokens_of(responses) -> list[int]:
    return [t for r in responses if r.WhichOneof("kind") == "delta" for t in r.delta.token_ids]


def test_streams_with_reasoning_apart_and_says_who_served(ch):
    req = request(max_tokens=12, reasoning_effort=pb.REASONING_EFFORT_LOW)
    req.chat.messages.add(role="user", content="Tell me about the sea.")
    out = generate(ch, req, timeout=120)
    reasoning = "".join(r.delta.reasoning_text for r in out if r.WhichOneof("kind") == "delta")
    answer = "".join(r.delta.text for r in out if r.WhichOneof("kind") == "delta")
    final = final_of(out)
    assert out[0].WhichOneof("kind") == "start"
    assert reasoning and final.usage.reasoning_tokens > 0
    assert "<think>" not in answer
    assert final.served_by.region == "test-eu" and final.served_by.replica
    assert final.decision.reasoning_effort == pb.REASONING_EFFORT_LOW
    assert "replica:" in final.decision.reason, final.decision.reason


def test_each_rank_holds_half_the_routed_experts(region, loop):
    statuses = replica_statuses(loop)
    assert len(statuses) == 2
    for s in statuses.values():
        ranks = s.ranks
        print(
            f"\nreplica {s.replica}: "
            + ", ".join(f"rank {r.ep_rank} holds {r.num_local_expert_params} of {r.num_expert_params}" for r in ranks)
        )
        assert [r.ep_rank for r in ranks] == [0, 1] and all(r.ep_size == 2 for r in ranks)
        assert all(r.num_local_expert_params * 2 == r.num_expert_params > 0 for r in ranks)


def test_ep2_through_the_cluster_equals_ep1_in_process(ch, loop, tmp_path):
    prompts = [[1, 17, 230, 45, 9, 800], [1] + list(range(300, 340)), [1, 5000, 12, 13]]
    got = [
        tokens_of(
            generate(
                ch, request(p, max_tokens=16, ignore_eos=True, reasoning_effort=pb.REASONING_EFFORT_NONE), timeout=120
            )
        )
        for p in prompts
    ]
    cfg = config_from_dict(CONFIG)
    engine = create_engine(cfg.engine)  # ep 1, in this process, same weights
    try:

        async def run(p):
            out = []
            async for d in engine.generate(
                f"ref-{len(p)}",
                p,
                SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, reasoning_effort="none"),
            ):
                out.extend(d.token_ids)
            return out

        want = [loop.run(run(p), timeout=120) for p in prompts]
    finally:
        engine.shutdown()
    assert got == want


def test_same_prefix_sticks_to_its_replica(ch):
    text = "You are a careful assistant. " * 20 + "Question one."
    first = final_of(generate(ch, request(text=text, max_tokens=2), timeout=120))
    again = final_of(generate(ch, request(text=text, max_tokens=2), timeout=120))
    assert again.served_by.replica == first.served_by.replica
    assert "prefix affinity" in again.decision.reason
    assert again.usage.cached_tokens > 0  # the point of affinity: the prefix cache pays off


def test_a_long_document_asked_twice_reaches_the_replica_that_holds_it(region, loop):
    opts = DocOptions(doc_tokens=960, question_tokens=16, max_tokens=4, seed=7)  # 60 blocks, then the question

    async def both():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{region.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            return [await ask(stub, f"long-doc-{i}", p, opts) for i, p in enumerate(prompts(opts))]

    one, two = loop.run(both(), timeout=300)
    assert one.prompt_tokens == two.prompt_tokens == 976
    assert two.replica == one.replica
    assert (one.cached_tokens, two.cached_tokens) == (0, 960)  # the whole document, from the prefix cache


def _all_idle(loop) -> bool:
    return all(
        s.stats is not None and s.stats.num_running == 0 and s.stats.num_used_blocks == 0 and s.outstanding == 0
        for s in replica_statuses(loop).values()
    )


def test_cancel_and_deadline_free_kv_blocks_on_the_replica(ch, loop):
    wait_until(lambda: _all_idle(loop), timeout=30, what="idle replicas before the test")
    call = ch.unary_stream(
        "/levante.v1.Inference/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    stream = call(request([1, 2, 3, 4, 5] * 10, max_tokens=500, ignore_eos=True), timeout=120)
    for r in stream:
        if r.WhichOneof("kind") == "delta":
            break
    assert any(s.stats.num_used_blocks > 0 for s in replica_statuses(loop).values())
    stream.cancel()
    wait_until(lambda: _all_idle(loop), timeout=30, what="blocks freed after cancel")

    err = rpc_error(lambda: generate(ch, request([1, 2, 3] * 10, max_tokens=500, ignore_eos=True), timeout=1.0))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _all_idle(loop), timeout=30, what="blocks freed after the deadline")


def test_full_queues_answer_resource_exhausted_and_recover(ch):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        try:
            generate(ch, request([1, 40 + i, 7], max_tokens=40, ignore_eos=True), timeout=120)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name if e.code() != grpc.StatusCode.UNAVAILABLE else f"UNAVAILABLE: {e.details()}"

    # 2 replicas x 3 ongoing, plus 1 queued per caller: 16 at once cannot all fit.
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(16)))
    print(f"\n16 concurrent calls: {sorted(codes)}")
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert tokens_of(generate(ch, request([1, 2, 3], max_tokens=4), timeout=120))  # still serving


def test_losing_one_rank_restarts_the_gang_and_traffic_goes_on(ch, loop):
    handle = replica_handle()
    victim = loop.run(_call(handle.status.remote())).replica
    # kill rank 1 of whichever replica answers the next kill call, then watch it come back
    loop.run(_call(handle.kill_rank.remote(1)))
    began = time.monotonic()
    served = []
    while time.monotonic() - began < 90:
        out = generate(ch, request([1, 9, 9, 9], max_tokens=3), timeout=120)  # must keep succeeding
        served.append(final_of(out).served_by.replica)
        statuses = replica_statuses(loop)
        if all(s.state == "serving" for s in statuses.values()) and sum(s.restarts for s in statuses.values()) >= 1:
            break
        time.sleep(0.5)
    statuses = replica_statuses(loop)
    restarted = [s for s in statuses.values() if s.restarts >= 1]
    print(
        f"\nrank 1 killed (asked {victim}); gang back after {time.monotonic() - began:.1f}s; "
        f"restarted {[s.replica for s in restarted]} ({restarted[0].last_failure if restarted else '-'}); "
        f"{len(served)} calls served meanwhile"
    )
    assert restarted and all(s.state == "serving" for s in statuses.values())
    assert tokens_of(generate(ch, request([1, 2, 3], max_tokens=4), timeout=120))


def test_region_stays_serving_while_one_replica_restarts_with_no_traffic(region, ch, loop):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.serve.replica_router import READY_TIMEOUT_S

    time.sleep(READY_TIMEOUT_S + 1)  # no recent answers: readiness rests on the probes alone
    loop.run(_call(replica_handle().kill_rank.remote(1)))
    health = health_pb2_grpc.HealthStub(ch)
    seen, began = [], time.monotonic()
    while time.monotonic() - began < 8:
        seen.append(health.Check(health_pb2.HealthCheckRequest(service="levante.v1.Inference"), timeout=5).status)
        time.sleep(0.25)
    assert set(seen) == {health_pb2.HealthCheckResponse.SERVING}, seen
    wait_until(
        lambda: all(s.state == "serving" for s in replica_statuses(loop).values()),
        timeout=90,
        what="the restarted gang back",
    )
