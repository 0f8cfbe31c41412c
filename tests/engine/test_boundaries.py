"""Import boundaries checked at run time, in fresh interpreters: what a module really loads, third-party
imports included, which the import-linter contracts in pyproject.toml (tests/test_lint.py) cannot see."""

import subprocess
import sys

import pytest


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
