"""The committed levante.v1 modules are exactly what protos/generate.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parents[2] / "protos"
STEMS = ("admin", "inference")
GENERATED = tuple(f"{stem}{suffix}" for stem in STEMS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def _load_generate_script():
    spec = importlib.util.spec_from_file_location("levante_protos_generate", PROTOS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("protos")
    _load_generate_script().generate(root)
    return root


@pytest.mark.parametrize("name", GENERATED)
def test_committed_module_matches_a_fresh_generation(fresh_root, name):
    fresh = (fresh_root / "levante" / "v1" / name).read_bytes()
    committed = (PROTOS / "levante" / "v1" / name).read_bytes()
    assert fresh == committed, f"protos/levante/v1/{name} is stale: run `python protos/generate.py`"


def test_every_proto_file_has_its_modules():
    protos = sorted(p.stem for p in (PROTOS / "levante" / "v1").glob("*.proto"))
    assert protos == sorted(STEMS)
    for stem in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (PROTOS / "levante" / "v1" / f"{stem}{suffix}").is_file()
