"""Resume: a request continues from output tokens another engine already streamed.

Every test compares against the uninterrupted run of the same request on the
same engine: a client received the deltas holding the first k tokens (and so
the text they carried, minus what the engine held back), then the request is
resumed with those tokens and char counts. The resumed run must produce the
remaining tokens exactly, the text the client misses exactly, and the same
final usage.

The model is a tiny random Mistral 4 with the v3 SentencePiece tokenizer, whose
thinking markers are the text markers ``<think>``/``</think>`` (three tokens
each), so a resume can fall inside a marker the engine is forcing. Prefix
caching is off, so a resumed request really recomputes its resumed tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, ReasoningConfig
from engine.core.request import SamplingParams
from engine.native.async_engine import AsyncEngine
from engine.native.builder import build_engine_core
from engine.native.engine_core import EngineCore
from engine.output import RequestState
from engine.reasoning import ReasoningState, resolve_markers
from engine.tokenizer import load_tokenizer, resolve_tokenizer_path
from engine.types import EngineError, RequestDelta, Resume
from tests.engine.native.test_async_engine import collect, run

TOKENIZER = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
CHAT = [{"role": "user", "content": "Tell me about the Levante wind"}]
NEVER = "\x00never\x00"  # a stop string that never matches: the answer text is held back by len - 1 chars
GREEDY = SamplingParams(temperature=0, max_tokens=16, stop=[NEVER])
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, stop=[NEVER])
SEEDED_NO_HOLD = SamplingParams(temperature=1.0, top_p=0.8, seed=99, max_tokens=16)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> EngineConfig:
    path = make_tiny("mistral4", seed=0, out=str(tmp_path_factory.mktemp("mistral4")), vocab_size=32768)
    return EngineConfig(
        model=ModelConfig(model=path, tokenizer=TOKENIZER, max_model_len=96),
        cache=CacheConfig(block_size=8, num_blocks=64, enable_prefix_caching=False),
        reasoning=ReasoningConfig(budget_low=3, budget_medium=6),
    )


@pytest.fixture(scope="module")
def core(config) -> EngineCore:
    return build_engine_core(config)


@pytest.fixture(scope="module")
def engine(config):
    eng = AsyncEngine(build_engine_core(config))
    yield eng
    eng.shutdown()


# ---- helpers ---------------------------------------------------------------------------------------


def drive(
    core: EngineCore, rid: str, prompt, params: SamplingParams, resume: Resume | None = None
) -> list[RequestDelta]:
    """One request from admission to its final delta."""
    core.add_request(rid, prompt, params, resume)
    deltas = []
    while core.has_unfinished_requests():
        deltas += [d for d in core.step() if d.request_id == rid]
    return deltas


def tokens(deltas: list[RequestDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text(deltas: list[RequestDelta]) -> str:
    return "".join(d.text for d in deltas)


def reasoning(deltas: list[RequestDelta]) -> str:
    return "".join(d.reasoning_text for d in deltas)


def client_after(deltas: list[RequestDelta], k: int) -> tuple[Resume, str, str]:
    """What a client holds after the deltas carrying the first ``k`` tokens: the resume it sends, its text."""
    got: list[RequestDelta] = []
    for d in deltas:
        if len(tokens(got)) >= k:
            break
        got.append(d)
    assert len(tokens(got)) == k, "each delta carries one token"
    return Resume(tokens(got), len(text(got)), len(reasoning(got))), text(got), reasoning(got)


def without_cache(deltas: list[RequestDelta]):
    # a resumed request may find other blocks cached than the original; everything else must be equal
    return dataclasses.replace(deltas[-1].usage, cached_tokens=0)


def assert_continues(full: list[RequestDelta], k: int, rest: list[RequestDelta]) -> None:
    _, sent_text, sent_reasoning = client_after(full, k)
    assert tokens(rest) == tokens(full)[k:]
    assert sent_text + text(rest) == text(full)
    assert sent_reasoning + reasoning(rest) == reasoning(full)
    assert rest[-1].finish_reason == full[-1].finish_reason
    assert without_cache(rest) == without_cache(full)


# ---- the resumed run equals the uninterrupted one --------------------------------------------------


@pytest.mark.parametrize("params", [GREEDY, SEEDED, SEEDED_NO_HOLD], ids=["greedy", "seeded", "seeded-no-hold"])
def test_resume_continues_the_uninterrupted_run(core, params):
    full = drive(core, "full", CHAT, params)
    n = len(tokens(full))
    assert n == params.max_tokens and full[-1].finish_reason == "length"
    for k in (1, n // 2, n - 1):
        resume, sent, _ = client_after(full, k)
        if params.stop:  # the client really misses a held-back tail, which must come now
            assert len(sent) < len(core.tokenizer.decode(tokens(full)[:k]))
        generated = core.stats().num_generated_tokens
        rest = drive(core, f"resumed-{k}", CHAT, params, resume)
        assert_continues(full, k, rest)
        assert rest[-1].usage.completion_tokens == n  # resumed + new, as in the uninterrupted run
        assert core.stats().num_generated_tokens - generated == n - k  # replayed tokens are not generated here


@pytest.mark.parametrize("effort", ["low", "medium"])
def test_resume_inside_a_thinking_span(core, effort):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=14, reasoning_effort=effort)
    full = drive(core, "think", CHAT, params)
    ids, start, end = tokens(full), core.markers.start, core.markers.end
    budget = core.config.reasoning.budget(effort)
    # the engine opened the span and closed it at the budget: the resume points below cross both markers
    assert tuple(ids[:3]) == start and tuple(ids[3 + budget : 6 + budget]) == end
    assert reasoning(full) and text(full) and full[-1].usage.reasoning_tokens == budget
    for k in range(1, len(ids)):  # inside the forced start marker, the span, the forced end marker, the answer
        rest = drive(core, f"think-{k}", CHAT, params, client_after(full, k)[0])
        assert_continues(full, k, rest)


def test_resume_next_to_a_running_request(core):
    full = drive(core, "alone", CHAT, SEEDED)
    k = 5
    core.add_request("other", "Another conversation entirely", SamplingParams(temperature=0, max_tokens=40))
    for _ in range(3):  # the other request is decoding when the resumed one arrives
        core.step()
    core.add_request("resumed", CHAT, SEEDED, client_after(full, k)[0])
    steps = []
    while core.has_unfinished_requests():
        steps.append(core.step())
    rest = [d for step in steps for d in step if d.request_id == "resumed"]
    assert any({d.request_id for d in step} == {"other", "resumed"} for step in steps)  # they shared steps
    assert_continues(full, k, rest)


@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
def test_stop_string_straddling_the_resume_point(core, include):
    plain = drive(core, "plain", CHAT, SamplingParams(temperature=0, max_tokens=16))
    # a stop string made of the end of token p-1's text and the start of token p's
    p = next(
        i
        for i in range(1, len(plain))
        if len(plain[i - 1].text) >= 2
        and len(plain[i].text) >= 2
        and text(plain).find(plain[i - 1].text[-2:] + plain[i].text[:2]) == len(text(plain[:i])) - 2
    )
    stop = plain[p - 1].text[-2:] + plain[p].text[:2]
    params = SamplingParams(temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=include)
    full = drive(core, "stops", CHAT, params)
    assert len(tokens(full)) == p + 1 and full[-1].finish_reason == "stop"
    assert text(full) == text(plain)[: len(text(plain[:p])) - 2 + (len(stop) if include else 0)]
    resume, sent, _ = client_after(full, p)
    assert len(sent) <= len(text(plain[:p])) - 2  # the previous server held the stop string's first half back
    rest = drive(core, "stops-resumed", CHAT, params, resume)
    assert_continues(full, p, rest)
    # the server that found the stop string died before reporting it: nothing is left to resume
    with pytest.raises(EngineError) as err:
        core.add_request("stopped", CHAT, params, Resume(tokens(full), resume.text_chars))
    assert err.value.field == "resume.token_ids" and "already finished" in err.value.message


def test_replay_at_every_delta_boundary_splits_text_exactly():
    """RequestState alone, every resume point: incomplete UTF-8, thinking markers and a stop string."""
    tok = load_tokenizer(resolve_tokenizer_path(TOKENIZER))
    markers = resolve_markers(tok, ReasoningConfig())
    thought = tok.encode(" 𝄞 so 🦩", add_special_tokens=False)  # byte-fallback tokens: decoded only when complete
    answer = tok.encode(" Grüße 龘 ist done. More", add_special_tokens=False)
    sampled = [0] * 3 + thought + [0] * 3 + answer  # 0: steps where the engine forces a marker token
    params = SamplingParams(stop=["done"])

    def new_state() -> RequestState:
        return RequestState("r", [1], params, ReasoningState(markers, "low", len(thought), [1]), tok)

    def stream(state: RequestState, sampled: list[int]) -> list[RequestDelta]:  # EngineCore's per-step handling
        deltas = []
        for s in sampled:
            deltas.append(state.add_tokens([state.reasoning.next_token(s)], None))
            if state.stopped_by_string:
                break
        return deltas + [state.finish("stop" if state.stopped_by_string else "length")]

    full = stream(new_state(), sampled)
    assert reasoning(full) == " 𝄞 so 🦩" and text(full) == " Grüße 龘 ist " and full[-1].finish_reason == "stop"
    n = len(tokens(full))
    for k in range(1, n):
        resume, sent, sent_reasoning = client_after(full, k)
        # what the client got from the deltas; also less (the counts, not the tokens, say where text resumes)
        for chars, reasoning_chars in {
            (len(sent), len(sent_reasoning)),
            (0, 0),
            (len(sent) // 2, len(sent_reasoning) // 2),
        }:
            state = new_state()
            state.replay(resume.token_ids, chars, reasoning_chars)
            rest = stream(state, sampled[k:])
            assert tokens(rest) == tokens(full)[k:]
            assert text(full)[:chars] + text(rest) == text(full), (k, chars)
            assert reasoning(full)[:reasoning_chars] + reasoning(rest) == reasoning(full), (k, reasoning_chars)
            assert rest[-1].usage == full[-1].usage
    with pytest.raises(ValueError, match="^resume.token_ids: already finished"):
        new_state().replay(tokens(full))


# ---- refusals --------------------------------------------------------------------------------------


def _refusals(tok):
    hello = tuple(tok.encode(" hello world", add_special_tokens=False))
    return {  # name: (params, resume, field)
        "nothing left under max_tokens": (SamplingParams(max_tokens=4), Resume([100] * 4), "resume.token_ids"),
        "nothing left under max_model_len": (SamplingParams(max_tokens=500), Resume([100] * 90), "resume.token_ids"),
        "token outside the vocab": (SamplingParams(), Resume([100, 32768]), "resume.token_ids"),
        "with prompt_logprobs": (SamplingParams(prompt_logprobs=1), Resume([100]), "resume"),
        "ends with eos": (SamplingParams(), Resume([100, 2]), "resume.token_ids"),
        "holds a stop token": (SamplingParams(stop_token_ids=[100]), Resume([100, 101]), "resume.token_ids"),
        "holds a stop string": (SamplingParams(stop=["world"]), Resume(hello), "resume.token_ids"),
        "not the forced marker": (SamplingParams(reasoning_effort="low"), Resume([100]), "resume.token_ids"),
        "more text than the tokens": (SamplingParams(), Resume(hello, text_chars=100), "resume.text_chars"),
        "more reasoning than the tokens": (
            SamplingParams(),
            Resume(hello, reasoning_chars=1),
            "resume.reasoning_chars",
        ),
    }


REFUSALS = list(_refusals(load_tokenizer(resolve_tokenizer_path(TOKENIZER))).items())


@pytest.mark.parametrize("params,resume,field", [case for _, case in REFUSALS], ids=[name for name, _ in REFUSALS])
def test_refused_resume_names_the_field_and_engine_keeps_serving(engine, params, resume, field):
    with pytest.raises(EngineError) as err:
        run(engine.submit("bad", CHAT, params, resume=resume))
    assert err.value.field == field
    assert run(engine.health())
    # the next resume through the EngineClient boundary is served, and continues its run exactly
    full = run(collect(engine, "good", CHAT, SEEDED))
    rest = run(collect_resumed(engine, "good-resumed", CHAT, SEEDED, client_after(full, 3)[0]))
    assert_continues(full, 3, rest)
    for _ in range(50):  # stats are refreshed by the engine thread after each step
        if run(engine.stats()).num_used_blocks == 0:
            break
        run(asyncio.sleep(0.02))
    assert run(engine.stats()).num_used_blocks == 0


async def collect_resumed(eng, rid: str, prompt, params: SamplingParams, resume: Resume) -> list[RequestDelta]:
    return [d async for d in eng.generate(rid, prompt, params, resume=resume)]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"token_ids": []}, "resume.token_ids"),
        ({"token_ids": [3, -1]}, "resume.token_ids"),
        ({"token_ids": [3, True]}, "resume.token_ids"),
        ({"token_ids": "abc"}, "resume.token_ids"),
        ({"token_ids": [3], "text_chars": -1}, "resume.text_chars"),
        ({"token_ids": [3], "reasoning_chars": 1.5}, "resume.reasoning_chars"),
    ],
)
def test_resume_fields_are_checked_on_construction(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        Resume(**kwargs)
    assert Resume([3, 4], 2).token_ids == (3, 4)  # lists from JSON or protobuf are frozen
