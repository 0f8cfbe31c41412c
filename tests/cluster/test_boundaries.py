"""Layer boundaries, read from the source: cluster/ reaches the engine only through its public
boundary, and protobuf types stay in the modules that speak the wire format."""

from __future__ import annotations

from ..source_imports import ROOT, imports_of, sources

ENGINE_BOUNDARY = {"engine.api", "engine.config"}
# The one command line stitches the engine's subcommands beside the cluster's.
CLI_EXTRA = {"cluster/cli.py": {"engine.cli"}}
# Where levante.v1 message types may appear: convert.py for levante.v1.Inference, admin.py for
# levante.v1.Admin (served), and the clients of each.
PROTO_MODULES = {
    "cluster/frontdoor/convert.py",
    "cluster/frontdoor/admin.py",
    "cluster/client.py",
    "cluster/drill/inject.py",
}
PROTO_PREFIXES = ("cluster/bench/",)


def test_cluster_imports_engine_only_through_its_boundary():
    offenders = {}
    for path in sources("cluster"):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ENGINE_BOUNDARY | CLI_EXTRA.get(rel, set())
        engine = {n for n in imports_of(path) if n == "engine" or n.startswith("engine.")}
        bad = {n for n in engine if not any(n == a or n.startswith(a + ".") for a in allowed)}
        if bad:
            offenders[rel] = sorted(bad)
    assert not offenders, f"cluster/ may import only {sorted(ENGINE_BOUNDARY)} from the engine: {offenders}"


def test_protobuf_types_stop_at_the_conversion_module():
    offenders = []
    for path in sources("cluster"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in PROTO_MODULES or rel.startswith(PROTO_PREFIXES):
            continue
        if any(n.startswith("levante.v1") for n in imports_of(path)):
            offenders.append(rel)
    assert not offenders, f"levante.v1 types outside {sorted(PROTO_MODULES)}: {offenders}"


def test_engine_never_imports_the_cluster():
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in sources("engine", "kernels")
        if any(n == "cluster" or n.startswith(("cluster.", "ray", "grpc", "levante")) for n in imports_of(p))
    ]
    assert not offenders, offenders


def test_the_checks_seeimports_of():
    # A scan that found nothing would pass everything: make sure it reads real imports.
    assert "engine.api" in imports_of(ROOT / "cluster" / "serve" / "ranks.py")
    assert any(n.startswith("levante.v1") for n in imports_of(ROOT / "cluster" / "frontdoor" / "convert.py"))
