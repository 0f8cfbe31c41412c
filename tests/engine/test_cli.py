"""``levante`` engine commands as a user runs them: make-tiny, generate, and their one-line errors."""

from __future__ import annotations

import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from engine.cli import main
from engine.tokenizer import resolve_tokenizer_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPM = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"  # 32768 tokens


def levante(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``levante ARGS`` in a fresh process, as from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny-tok") / "m")
    assert main(["models", "make-tiny", "--arch", "mistral", "--seed", "0", "--out", out, "--tokenizer", SPM]) == 0
    return out


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> str:
    """A tiny checkpoint without a tokenizer: vocab_size 512."""
    out = str(tmp_path_factory.mktemp("tiny-bare") / "m")
    assert main(["models", "make-tiny", "--arch", "mistral", "--seed", "0", "--out", out]) == 0
    return out


def test_make_tiny_with_tokenizer_sizes_the_vocabulary_to_it(with_tokenizer):
    import json

    config = json.loads((pathlib.Path(with_tokenizer) / "config.json").read_text())
    assert config["vocab_size"] == 32768
    assert (pathlib.Path(with_tokenizer) / "mistral_instruct_tokenizer_240323.model.v3").is_file()


@pytest.mark.slow
def test_make_tiny_then_generate_prints_text(with_tokenizer):
    done = levante("generate", "Hello", "--model", with_tokenizer, "--max-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "no text printed"
    assert "[length; prompt " in done.stderr


@pytest.mark.slow
def test_tokenizer_larger_than_the_model_is_one_line_and_exit_2(bare):
    done = levante("generate", "Hello", "--model", bare, "--tokenizer", SPM)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("levante: error: tokenizer: "), done.stderr
    assert "32768" in lines[0] and "512" in lines[0]


def test_tokenizer_in_the_folder_larger_than_the_model_is_refused_at_load(bare, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(bare, model)
    shutil.copy(resolve_tokenizer_path(SPM), model)
    assert main(["generate", "Hello", "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("levante: error: tokenizer: ") and "32768" in err and "vocab_size 512" in err


def test_prompt_ids_drive_a_model_without_a_tokenizer(bare, capsys):
    assert main(["generate", "--prompt-ids", "1,2,3", "--model", bare, "--max-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) == 4 and all(t.isdigit() for t in out.out.split())  # the ids, nothing to decode
    assert "[length; prompt 3 tokens, completion 4" in out.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "Hello"], "this model has no tokenizer; send token ids with --prompt-ids"),
        (["generate", "--prompt-ids", "1,600"], "prompt: token ids must be integers in [0, 512)"),
        (["generate", "Hello", "--prompt-ids", "1"], "prompt: give either a prompt or --prompt-ids"),
    ],
)
def test_prompt_errors_are_one_line(bare, capsys, argv, message):
    assert main([*argv, "--model", bare]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("levante: error: ") and message in err and len(err.splitlines()) == 1


REASONING_EXAMPLE = 'levante generate "Why is the sky blue?" --reasoning-effort low --max-tokens 64'


@pytest.mark.slow
def test_reasoning_example_prints_an_answer_after_thinking(capsys):
    assert REASONING_EXAMPLE in (ROOT / "README.md").read_text()  # the documented command, as written
    assert main(shlex.split(REASONING_EXAMPLE)[1:]) == 0
    out = capsys.readouterr().out
    assert "[thinking] " in out and "\n[answer] " in out
    thinking, answer = out.split("\n[answer] ", 1)
    assert thinking.strip() and answer.strip(), out
