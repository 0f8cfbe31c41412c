"""Model and tokenizer URIs in configs: ``tiny:<arch>?k=v`` and ``mistral-common:<file>``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint.cache import build_once
from engine.checkpoint.files import ModelLoadError
from engine.checkpoint.folder import read_config, resolve_model_dir
from engine.checkpoint.tiny import make_tiny
from engine.checkpoint.uris import parse_tiny_uri, tiny_model_dir
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.native.builder import build_engine_core
from engine.tokenizer import MistralCommonTokenizer, load_tokenizer, resolve_tokenizer_path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LEVANTE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_tiny_uri_parses_seed_and_overrides():
    assert parse_tiny_uri("tiny:mixtral") == ("mixtral", 0, {})
    assert parse_tiny_uri("tiny:mistral4?seed=3&vocab_size=32768&norm_topk_prob=false") == (
        "mistral4",
        3,
        {"vocab_size": 32768, "norm_topk_prob": False},
    )
    assert parse_tiny_uri("tiny:mistral?seed=3&vocab_size=32768&sliding_window=null") == (
        "mistral",
        3,
        {"vocab_size": 32768, "sliding_window": None},
    )


@pytest.mark.parametrize(
    "uri,message",
    [
        ("tiny:gpt2", "unknown tiny architecture 'gpt2'"),
        ("tiny:", "unknown tiny architecture ''"),
        ("tiny:mixtral?seed=x", "seed must be an integer"),
        ("tiny:mixtral?n_routed_experts=4", "'n_routed_experts' cannot be set for tiny mixtral"),
        ("tiny:mixtral?rope_parameters=1", "'rope_parameters' cannot be set"),
        ("tiny:mixtral?seed", "bad query string"),
    ],
)
def test_bad_tiny_uris_are_named(uri, message, cache_dir):
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
        resolve_model_dir(uri)
    assert not cache_dir.exists() or not any((cache_dir / "models").glob("tiny-*"))


def test_tiny_uri_builds_make_tiny_weights_once(cache_dir, tmp_path, capfd):
    folder = Path(resolve_model_dir("tiny:mixtral?seed=4&num_hidden_layers=1"))
    assert folder.parent == cache_dir / "models" and folder.name.startswith("tiny-mixtral-")
    assert "building 'tiny:mixtral?seed=4&num_hidden_layers=1'" in capfd.readouterr().err
    expected = _weights(Path(make_tiny("mixtral", 4, str(tmp_path / "direct"), num_hidden_layers=1)))
    got = _weights(folder)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert read_config(folder)["num_hidden_layers"] == 1

    stamp = (folder / "config.json").stat().st_mtime_ns
    capfd.readouterr()
    assert resolve_model_dir("tiny:mixtral?seed=4&num_hidden_layers=1") == str(folder)  # cached
    assert (folder / "config.json").stat().st_mtime_ns == stamp and "building" not in capfd.readouterr().err
    assert tiny_model_dir("tiny:mixtral?seed=5&num_hidden_layers=1") != folder  # another seed, another folder
    assert [p.name for p in (cache_dir / "models").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_concurrent_builds_end_with_one_complete_folder(tmp_path):
    final = tmp_path / "models" / "thing"
    barrier = threading.Barrier(2, timeout=10)
    built: list[str] = []

    def build(tmp: Path) -> None:
        (tmp / "part1").write_text(threading.current_thread().name)
        barrier.wait()  # both builders are half way before either renames
        (tmp / "part2").write_text("done")
        built.append(threading.current_thread().name)

    def complete(folder: Path) -> bool:
        return (folder / "part1").is_file() and (folder / "part2").is_file()

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once(final, build, complete, "building")), name=f"b{i}")
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(built) == ["b0", "b1"] and results == [final, final]
    assert complete(final) and sorted(p.name for p in final.iterdir()) == ["part1", "part2"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]  # the loser's temp folder is gone


def test_mistral_common_tokenizer_uri_names_a_packaged_file():
    path = resolve_tokenizer_path("mistral-common:tekken_240911.json")
    assert (
        Path(path).is_file() and Path(path).parent.name == "data" and Path(path).parent.parent.name == "mistral_common"
    )
    assert isinstance(load_tokenizer(path), MistralCommonTokenizer)
    assert resolve_tokenizer_path("/some/folder") == "/some/folder"  # plain paths pass through


@pytest.mark.parametrize("name", ["mistral-common:nope.json", "mistral-common:", "mistral-common:../__init__.py"])
def test_unknown_mistral_common_files_list_the_available_ones(name):
    with pytest.raises(
        ValueError, match=r"^tokenizer: .*is not a mistral-common tokenizer file \(available: .*tekken_240911\.json"
    ):
        resolve_tokenizer_path(name)


def test_an_engine_config_can_name_both(cache_dir):
    """A tiny model with a real Mistral tokenizer: text in, tokens out, and info names the URI."""
    uri = "tiny:mistral?seed=2&vocab_size=32768&num_hidden_layers=1"
    core = build_engine_core(
        EngineConfig(
            model=ModelConfig(model=uri, tokenizer="mistral-common:mistral_instruct_tokenizer_240323.model.v3"),
            cache=CacheConfig(num_blocks=16),
        )
    )
    info = core.info()
    assert (info.model, info.architecture, info.vocab_size) == (uri, "MistralForCausalLM", 32768)
    core.add_request("r", "Hello world")
    assert core.requests["r"].prompt_token_ids == [1, 23325, 2294]
