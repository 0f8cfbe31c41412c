"""Two in-process regions over gRPC: a full region spills to its peer, a preferred region is tried
first, and only when every region is full does the caller see RESOURCE_EXHAUSTED."""

from __future__ import annotations

import grpc
import pytest

from levante.v1 import inference_pb2 as pb

from ..frontdoor.harness import generate
from .fakes import Full
from .test_two_regions import Regions

pytestmark = pytest.mark.e2e


def _call(regions: Regions, region: str, req: pb.GenerateRequest) -> pb.Final:
    with grpc.insecure_channel(regions.target(region)) as ch:
        return generate(ch, req)[-1].final


def test_a_full_region_spills_to_its_peer(loop, engines):
    regions = Regions(loop, engines, wrap_eu=Full)
    try:
        final = _call(regions, "eu", pb.GenerateRequest(prompt="hello", max_tokens=4, temperature=0.0))
        assert final.served_by.region == "us"
        hop = final.failovers[0]
        assert hop.from_region == "eu" and hop.at_token == 0 and hop.reason.startswith("resource_exhausted")
        with grpc.insecure_channel(regions.target("us")) as ch:  # us is full too: then, and only then
            members = regions.routers["us"].backend.members
            members["us"] = Full(members["us"])
            with pytest.raises(grpc.RpcError) as e:
                generate(ch, pb.GenerateRequest(prompt="hello", max_tokens=4))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "every region is full" in e.value.details()
    finally:
        regions.close()


def test_the_preferred_region_is_tried_first(loop, engines):
    regions = Regions(loop, engines)
    try:
        req = pb.GenerateRequest(prompt="hello", max_tokens=4, temperature=0.0, preferred_region="us")
        final = _call(regions, "eu", req)
        assert final.served_by.region == "us" and not final.failovers  # chosen, not failed over
        req.preferred_region = "mars"  # unknown: ignored, the local region serves
        assert _call(regions, "eu", req).served_by.region == "eu"
    finally:
        regions.close()
