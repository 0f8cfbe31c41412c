"""A constrained stream across a region failover: the next region rebuilds the grammar state from the
tokens already sent, so the answer the client sees is one valid JSON document, equal to an
uninterrupted run, with no token lost or repeated. Both ways a stream moves: the client library
replaying in the next region (an end client), and a region router resuming in its peer (``resume``)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine.types import StructuredOutput
from tests.engine.test_structured import SCHEMAS

from .fakes import HoldsAfter
from .test_two_regions import Regions, collect, text, token_ids

pytestmark = pytest.mark.e2e
NESTED = StructuredOutput("json_schema", json.dumps(SCHEMAS["nested"]), name="nested", strict=True)
ASK = dict(prompt="Report the wind as JSON", max_tokens=96, ignore_eos=False, response_format=NESTED)


def assert_one_valid_answer(chunks, reference) -> None:
    assert chunks[-1].error is None and chunks[-1].finish_reason == "stop"
    assert token_ids(chunks) == token_ids(reference) and text(chunks) == text(reference)
    jsonschema.validate(json.loads(text(chunks)), SCHEMAS["nested"])


def test_client_replays_a_constrained_stream_in_the_next_region(loop, engines):
    # eu goes silent after 6 tokens, so the answer cannot finish there before its door is stopped
    regions = Regions(loop, engines, wrap_eu=lambda local: HoldsAfter(local, 6))
    try:
        reference = collect(loop, regions.endpoints("us"), **ASK)
        assert len(token_ids(reference)) > 10, "the answer must outlive the failover point"

        async def kill_eu_after_6_tokens(chunks):
            if len(token_ids(chunks)) >= 6 and regions.doors["eu"].port:
                regions.doors["eu"].port = 0
                await regions.doors["eu"].stop()  # the region's front door goes away mid-stream

        chunks = collect(loop, regions.endpoints("eu", "us"), on_chunk=kill_eu_after_6_tokens, **ASK)
        assert chunks[-1].served_by.region == "us" and chunks[-1].failovers[0].from_region == "eu"
        assert_one_valid_answer(chunks, reference)
    finally:
        regions.close()


def test_region_router_resumes_a_constrained_stream_in_its_peer(loop, engines):
    regions = Regions(loop, engines, break_eu_after=8)
    try:
        reference = collect(loop, regions.endpoints("us"), **ASK)
        chunks = collect(loop, regions.endpoints("eu"), **ASK)  # eu's router resumes in us: resume + response_format
        final = chunks[-1]
        assert final.served_by.region == "us" and [(h.from_region, h.at_token) for h in final.failovers] == [("eu", 8)]
        assert_one_valid_answer(chunks, reference)
    finally:
        regions.close()
