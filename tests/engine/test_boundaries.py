"""Import boundaries that keep the layers honest, checked in fresh interpreters."""

import subprocess
import sys

import pytest

from ..source_imports import ROOT, imports_of, sources


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_engine_core_and_api_import_no_torch():
    mods = _modules_after(
        "import engine.core.scheduler, engine.core.kv_cache, engine.core.block_pool, "
        "engine.core.request, engine.api, engine.types, engine.config"
    )
    assert "torch" not in mods


def test_no_import_cycle_runs_through_engine_api():
    """engine.api assembles engines and everything inside speaks engine.types, so nothing it loads imports it back."""
    import grimp

    graph = grimp.build_graph("engine", cache_dir=None)
    loaded_by_api = graph.find_upstream_modules("engine.api")
    importing_api = graph.find_downstream_modules("engine.api")
    assert loaded_by_api and not loaded_by_api & importing_api, sorted(loaded_by_api & importing_api)


# Telemetry lives in cluster/: the engine records plain figures (RequestTimings, EngineStats) and
# the cluster turns them into spans and metrics, so the engine runs the same with tracing on or off.
TELEMETRY = ("opentelemetry", "prometheus_client")


@pytest.mark.slow
def test_engine_imports_no_ray_grpc_protobuf():
    mods = _modules_after("import engine.llm, engine.native.async_engine, engine.cli")
    assert not {m for m in mods if m.split(".")[0] in ("ray", "grpc", "google") + TELEMETRY}


def test_engine_and_kernels_import_no_telemetry():
    files = sources("engine", "kernels")
    assert any("torch" in imports_of(p) for p in files)  # the scan reads real imports
    offenders = {
        p.relative_to(ROOT).as_posix(): sorted(n for n in imports_of(p) if n.split(".")[0] in TELEMETRY) for p in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_our_kernels_package_is_not_mistaken_for_hf_kernels():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from transformers.utils.import_utils import is_kernels_available;print(is_kernels_available())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_only_engine_vllm_imports_vllm():
    files = sources("engine", "kernels", "cluster")
    importers = {p.relative_to(ROOT).as_posix() for p in files if any(n.split(".")[0] == "vllm" for n in imports_of(p))}
    assert importers and all(f.startswith("engine/vllm/") for f in importers), importers
