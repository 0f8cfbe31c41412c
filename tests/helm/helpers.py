"""Render the levante chart with a real Helm engine and check what comes out.

helm-python-sdk binds libhelm_c (Helm v4's Go SDK, shipped inside the wheel) with ctypes: rendering,
linting and values-schema checks run in-process, offline, in milliseconds. Kubernetes' own kinds are
checked with kubernetes-validate (its schemas ship with it); the custom resources against the CRDs
kept in data/ (see data/README.md).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "levante"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DATA = Path(__file__).resolve().parent / "data"
RELEASE = "levante-test"
NAMESPACE = "levante"
# The newest Kubernetes version whose schemas kubernetes-validate ships.
KUBE_VERSION = kubernetes_validate.latest_version()
CRDS = {
    ("ray.io/v1", "RayService"): DATA / "ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DATA / "monitoring.coreos.com_servicemonitors.yaml",
}


def example_values(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in as Helm merges values: mappings recursively, anything else
    replaced; ``None`` removes the key."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(values: dict[str, Any], chart_dir: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` (install mode). Raises helm_python.HelmError."""
    with helm.Chart.load(chart_dir) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered templates (NOTES.txt and empty documents left out)."""
    docs = []
    for name, text in sorted(rendered.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def lint(values: dict[str, Any]) -> dict[str, Any]:
    """`helm lint --strict` (warnings count as errors) for the newest Kubernetes version we validate against."""
    return helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")


def kube_errors(doc: dict[str, Any]) -> list[str]:
    """`kubernetes-validate --strict` on one object of a built-in kind; a kind without a schema is an error too."""
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def strict_schema(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as the API server's strict field validation does.

    CRD schemas list the known fields without ``additionalProperties: false`` (the server prunes or
    rejects the rest); JSON Schema would accept anything, so close every object that lists its
    properties, except those marked ``x-kubernetes-preserve-unknown-fields``.
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """A validator for ``spec.versions[].schema.openAPIV3Schema`` of the CRD kept for this kind and version."""
    with open(CRDS[(api_version, kind)], encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: the C loader if built
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, "the CRD file holds another kind"
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"], f"{api_version} {kind} is not served by this CRD"
    schema = strict_schema(entry["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def pod_templates(rayservice: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
