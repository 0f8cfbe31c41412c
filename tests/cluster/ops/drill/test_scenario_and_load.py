"""Scenario files, the shipped drills, and the pure parts of the load and replay check."""

from __future__ import annotations

import asyncio
import glob
import os

import pytest
import yaml

from cluster.config_loader import ConfigError
from cluster.ops.drill.load import LoadRunner, failovers_with_times
from cluster.ops.drill.replay import compare, replay_check
from cluster.ops.drill.scenario import LoadSpec, check_faults, load_scenario
from cluster.ops.up.topology import region_configs
from cluster.types import UNAVAILABLE, Chunk, ChunkError, FailoverHop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
SHIPPED = sorted(
    p
    for p in glob.glob(os.path.join(REPO, "configs", "drills", "*.yaml"))
    if not os.path.basename(p).startswith("two-regions")
)


def test_the_shipped_drills_are_the_five_scenarios_and_the_vllm_outage():
    names = {os.path.splitext(os.path.basename(p))[0] for p in SHIPPED}
    assert names == {
        "region-outage",
        "region-freeze",
        "replica-loss",
        "ep-rank-loss",
        "rolling-drain",
        "region-outage-vllm",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_drill_loads_with_its_regions(path):
    scenario, topology, overrides = load_scenario(path)
    configs = region_configs(topology, overrides)
    check_faults(scenario, list(configs), path)
    assert scenario.faults and scenario.slo.max_failed == 0 and scenario.slo.max_lost_tokens == 0
    assert scenario.load.requests <= 200 and scenario.load.max_seconds <= 60  # bounded, as a drill must be


def _scenario(tmp_path, **data):
    (tmp_path / "topo.yaml").write_text(yaml.safe_dump({"regions": [{"name": "a"}, {"name": "b"}]}))
    (tmp_path / "local.yaml").write_text("{}")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "topology": "topo.yaml", **data}))
    return str(path)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"faults": [{"kind": "explode", "region": "a", "at_s": 1}]}, r"faults\[0\]\.kind: must be one of"),
        ({"faults": [{"kind": "kill_region", "region": "a", "at_s": -1}]}, r"faults\[0\]\.at_s: must be >= 0"),
        ({"load": {"max_seconds": 0}}, r"load\.max_seconds: must be in \(0, 3600\]"),
        ({"load": {"requests": 10**6}}, r"load\.requests: must be <= 100000"),
        ({"slo": {"max_failed": "none"}}, r"slo\.max_failed: expected int"),
        ({"topology": "nowhere.yaml"}, r"topology: no such file"),
    ],
)
def test_bad_scenarios_name_the_key(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_scenario(_scenario(tmp_path, **data))


def test_a_fault_on_an_unknown_region_is_refused(tmp_path):
    path = _scenario(tmp_path, faults=[{"kind": "kill_region", "region": "mars", "at_s": 1}])
    scenario, topology, overrides = load_scenario(path)
    with pytest.raises(ConfigError, match=r"faults\[0\]\.region: 'mars' is not a region of the topology \(a, b\)"):
        check_faults(scenario, list(region_configs(topology, overrides)), path)


def test_failover_time_is_when_the_first_token_past_the_hop_arrived():
    arrivals = [(1.0, 2), (1.1, 4), (3.5, 5), (3.6, 9)]  # (time, tokens received so far)
    hops = failovers_with_times([FailoverHop("eu", "unavailable: reset", 4)], "us", arrivals)
    assert (hops[0].from_region, hops[0].to_region, hops[0].t) == ("eu", "us", 3.5)
    before_start = failovers_with_times(
        [FailoverHop("eu", "refused", 0), FailoverHop("ap", "timeout", 0)], "us", [(0.7, 3)]
    )
    assert [(h.to_region, h.t) for h in before_start] == [("ap", 0.7), ("us", 0.7)]


def test_replay_comparison_counts_duplicated_and_lost_tokens():
    assert compare([1, 2, 3, 4], [1, 2, 3, 4]) == (0, 0)
    assert compare([1, 2, 3, 3, 4], [1, 2, 3, 4]) == (1, 0)  # a token sent twice
    assert compare([1, 2, 4], [1, 2, 3, 4]) == (0, 1)  # a token never sent
    assert compare([1, 9, 4], [1, 2, 3, 4]) == (1, 2)  # a wrong continuation: both


class _FailsAfterOneToken:
    """A client whose every stream gives one token, then the route's final error."""

    class backend:
        @staticmethod
        def order(preferred):
            return ["eu"]

    async def generate(self, prompt, **kw):
        yield Chunk(token_ids=[5])
        yield Chunk(finished=True, error=ChunkError(UNAVAILABLE, "regions", "no region could serve this request"))


def test_a_failed_request_is_recorded_with_its_code_and_its_error():
    runner = LoadRunner(_FailsAfterOneToken(), LoadSpec(requests=1), clock=lambda: 0.0)
    record = asyncio.run(runner.one(0))
    assert (record.code, record.tokens, record.region) == ("UNAVAILABLE", [5], "")
    assert record.error == "no region could serve this request"
    assert type(record).from_dict(record.to_dict()) == record  # saved with the records and read back


def test_a_replay_that_fails_leaves_its_stream_unchecked_and_says_why():
    runner = LoadRunner(_FailsAfterOneToken(), LoadSpec(requests=1), clock=lambda: 0.0)
    record = asyncio.run(runner.one(0))
    record.code = "OK"  # as if the load's stream had ended right; its replay fails
    checked, failed = asyncio.run(replay_check(runner, [record], 1))
    assert checked == 0 and failed == ["replay-0: no region could serve this request"]
    assert record.duplicated_tokens is None
