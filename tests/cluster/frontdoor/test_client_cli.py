"""``levante client health | models | generate`` as documented (README.md, docs/serving.md), run as a
user runs them, in their own processes, against a real front door over a tiny MoE engine."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from cluster.config import FrontDoorConfig
from engine.api import create_engine
from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

from .harness import MODEL, engine_backend, serving, spm_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def door(loop, tmp_path_factory):
    path = make_tiny("mistral4", seed=0, out=str(tmp_path_factory.mktemp("tiny-mistral4")), vocab_size=32768)
    # 32 tokens of prefill per step: a document of a few hundred tokens is prefilled in many steps
    engine = create_engine(
        EngineConfig(
            model=ModelConfig(model=path, tokenizer=spm_tokenizer(), num_threads=1),
            cache=CacheConfig(num_blocks=64),
            scheduler=SchedulerConfig(max_model_len=512, max_num_batched_tokens=32),
        )
    )
    backend = engine_backend(loop, engine)
    with serving(loop, backend, FrontDoorConfig(port=0)) as d:
        yield d
    engine.shutdown()


def levante(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def test_client_health_models_and_generate(door):
    target = f"localhost:{door.port}"
    health = levante("client", "health", "--target", target)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stdout + health.stderr
    models = levante("client", "models", "--target", target)
    assert models.returncode == 0 and MODEL in models.stdout, models.stdout + models.stderr
    gen = levante("client", "generate", "--target", target, "--effort", "low", "Why is the sky blue?")
    assert gen.returncode == 0, gen.stdout + gen.stderr
    assert "effort low" in gen.stdout + gen.stderr, gen.stdout + gen.stderr


def test_generate_about_a_file_draws_the_prefill_progress_on_stderr_only(door, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse keeper counted the ships that passed the cape each night. " * 12)
    target = f"localhost:{door.port}"
    ask = ("client", "generate", "--target", target, "--max-tokens", "4", "--file", str(doc), "Who counted the ships?")
    gen = levante(*ask, "--progress")
    assert gen.returncode == 0, gen.stdout + gen.stderr
    drawn = [int(n) for n in re.findall(r"prefill \[[#.]+\] (\d+)/\d+ prompt tokens", gen.stderr)]
    assert len(drawn) >= 3 and drawn == sorted(drawn), gen.stderr  # several steps of 32 tokens, in order
    total = int(re.search(r"/(\d+) prompt tokens", gen.stderr).group(1))
    assert drawn[-1] < total and int(re.search(r"prompt (\d+),", gen.stderr).group(1)) == total
    assert "prefill" not in gen.stdout  # the answer's stream stays clean
    quiet = levante(*ask)  # stderr is not a terminal here: no bar unless asked
    assert quiet.returncode == 0 and "prefill" not in quiet.stderr, quiet.stderr
    missing = levante("client", "generate", "--target", target, "--file", str(tmp_path / "nope.txt"), "q")
    assert missing.returncode != 0 and "--file: cannot read" in missing.stderr, missing.stderr
