"""The RegionClient example in docs/regions.md, run as written against real front doors over the
embedded default model: only its two addresses change (to this test's ports)."""

from __future__ import annotations

import pathlib
import re

import pytest

from cluster.backends import LocalBackend
from cluster.config import FrontDoorConfig
from cluster.frontdoor import FrontDoor
from cluster.types import ModelInfo
from engine.api import create_engine
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DOC = pathlib.Path(__file__).parents[3] / "docs" / "regions.md"
ADDRESSES = {"eu-west": "10.0.0.1:50051", "us-east": "10.1.0.1:50051"}
MODEL = "levante-default"


def client_example() -> str:
    section = DOC.read_text().split("## The client library", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert blocks, "docs/regions.md: no python block under 'The client library'"
    return blocks[0]


@pytest.fixture(scope="module")
def doors(loop):
    engine = create_engine(
        EngineConfig(
            model=ModelConfig(num_threads=1),
            cache=CacheConfig(num_blocks=64),
            scheduler=SchedulerConfig(max_model_len=512),
        )
    )
    info = loop.run(engine.info())
    made = {}
    for region in ADDRESSES:  # two regions' front doors over one engine: the example names two
        door = FrontDoor(
            FrontDoorConfig(port=0), LocalBackend(engine, ModelInfo(MODEL, info.max_model_len), region), region, MODEL
        )
        loop.run(door.start())
        made[region] = door
    yield made
    for door in made.values():
        loop.run(door.stop())
    engine.shutdown()


def test_the_documented_example_runs_and_answers(doors, capsys):
    code = client_example()
    for region, address in ADDRESSES.items():
        assert f"{region}={address}" in code, f"the example no longer names {region}={address}"
        code = code.replace(address, f"127.0.0.1:{doors[region].port}")
    exec(compile(code, str(DOC), "exec"), {"__name__": "__main__"})  # noqa: S102 -- the doc's example as __main__: its own asyncio.run(main())
    out = capsys.readouterr().out
    answer, _, summary = out.rstrip("\n").rpartition("\n")
    assert answer.strip(), f"no answer: {out!r}"
    assert "Paris" in answer  # a real answer: the chat template was applied
    assert summary == "[stop; served by eu-west]", out
