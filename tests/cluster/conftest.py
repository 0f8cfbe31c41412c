"""Fixtures shared by the cluster tests."""

from __future__ import annotations

import pytest

from engine.api import create_engine
from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

from .frontdoor.harness import LoopThread, spm_tokenizer


@pytest.fixture(scope="module")
def loop():
    """An event loop in its own thread, one per test module: servers run on it, tests call in blocking style."""
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> str:
    """Mistral 4 shaped (MLA, routed experts + a shared one) with a real tokenizer's vocabulary."""
    return make_tiny("mistral4", seed=0, out=str(tmp_path_factory.mktemp("tiny-mistral4")), vocab_size=32768)


@pytest.fixture(scope="module")
def engines(tiny_moe):
    """Two in-process engines over the same weights, one per region of the two-region tests."""
    made = {
        name: create_engine(
            EngineConfig(
                model=ModelConfig(model=tiny_moe, tokenizer=spm_tokenizer(), num_threads=1),
                cache=CacheConfig(num_blocks=64),
                scheduler=SchedulerConfig(max_model_len=512),
            )
        )
        for name in ("eu", "us")
    }
    yield made
    for eng in made.values():
        eng.shutdown()
