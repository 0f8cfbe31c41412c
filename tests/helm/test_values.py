"""Bad values stop the render with a message naming what to change; the chart follows Levante's own config.

values.schema.json rejects single bad values (Helm's message gives the path and the rule); the
templates' `fail` rejects combinations (GPU capacity, the engine backend against the replica, TLS and
probes, chart-owned keys): `helm
install` and `helm template` stop on those, while `helm lint` only logs them (Helm's lint mode), so
the render is what checks them here. A broken template fails the render test too. The schema's `levante` section and values.yaml follow
cluster/config.py, checked key by key, so a new config key cannot silently miss the chart.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tomllib

import helm_python as helm
import pytest
import yaml

from cluster.config import ClusterConfig
from cluster.config_loader import config_from_dict, config_to_dict
from tests.cluster.schema import describe_schema
from tests.helm.helpers import CHART, ROOT, example_values, lint, manifests, merged, render

ONE_REGION = example_values(CHART / "examples" / "one-region.yaml")  # vllm: 1 replica x tensor parallel 4
# The native engine on the same pod: 1 replica x ep_size 4 ranks, one GPU and 2 CPUs each.
NATIVE = {"levante": {"engine": {"backend": "native", "vllm": None}, "replica": {"ep_size": 4}}}


def native(patch):
    """``patch`` on top of ONE_REGION switched to the native engine."""
    return merged(NATIVE, patch)


def gpu_group(replicas, gpu, cpu=16, name="gpu"):
    return {"name": name, "replicas": replicas, "cpu": cpu, "memory": "64Gi", "gpu": gpu}


BAD = {
    # values.schema.json: one value at a time; Helm names the path and the rule.
    "negative replica count": (
        {"levante": {"replica": {"num_replicas": -1}}},
        helm.HelmValuesError,
        r"at '/levante/replica/num_replicas': minimum: got -1, want 1",
    ),
    "unknown config key": (
        {"levante": {"replica": {"ep_sise": 2}}},
        helm.HelmValuesError,
        r"at '/levante/replica': additional properties 'ep_sise' not allowed",
    ),
    "unknown chart key": (
        {"frontdoor": {"replica": 3}},
        helm.HelmValuesError,
        r"at '/frontdoor': additional properties 'replica' not allowed",
    ),
    "empty image repository": (
        {"image": {"repository": ""}},
        helm.HelmValuesError,
        r"at '/image/repository': minLength: got 0, want 1",
    ),
    "missing region": (
        {"levante": {"region": None}},
        helm.HelmValuesError,
        r"at '/levante': missing property 'region'",
    ),
    "region not a DNS label": (
        {"levante": {"region": "EU West"}},
        helm.HelmValuesError,
        r"at '/levante/region': '.*' does not match pattern",
    ),
    "wrong type": (
        {"levante": {"replica": {"ep_size": "4"}}},
        helm.HelmValuesError,
        r"at '/levante/replica/ep_size': got string, want integer",
    ),
    "unknown accelerator": (
        {"levante": {"replica": {"accelerator": "tpu"}}},
        helm.HelmValuesError,
        r"at '/levante/replica/accelerator': value must be one of 'cpu', 'gpu'",
    ),
    "peer target without port": (
        {"levante": {"regions": {"peers": [{"name": "us-east", "target": "levante-us-east"}]}}},
        helm.HelmValuesError,
        r"at '/levante/regions/peers/0/target': '.*' does not match pattern",
    ),
    # Templates: combinations of values.
    "RayService name KubeRay refuses": (
        {"fullnameOverride": "1-eu-west"},
        helm.HelmRenderError,
        r"the RayService name \"1-eu-west\" .* must start with a letter",
    ),
    "chart-owned ray section": (
        {"levante": {"ray": {"address": "ray://head:10001"}}},
        helm.HelmRenderError,
        r"levante\.ray: set by the chart",
    ),
    "chart-owned frontdoor host": (
        {"levante": {"frontdoor": {"host": "127.0.0.1"}}},
        helm.HelmRenderError,
        r"levante\.frontdoor\.host: set by the chart",
    ),
    "chart-owned frontdoor tls": (
        {"levante": {"frontdoor": {"tls": {"cert": "/x.pem", "key": "/y.pem"}}}},
        helm.HelmRenderError,
        r"levante\.frontdoor\.tls: set by the chart from tls\.\*",
    ),
    "chart-owned metrics host": (
        {"levante": {"telemetry": {"metrics": {"host": "127.0.0.1"}}}},
        helm.HelmRenderError,
        r"levante\.telemetry\.metrics\.host: set by the chart",
    ),
    "service monitor without metrics": (
        {
            "monitoring": {"serviceMonitor": {"enabled": True}},
            "levante": {"telemetry": {"metrics": {"enabled": False}}},
        },
        helm.HelmRenderError,
        (
            r"monitoring\.serviceMonitor\.enabled: the front door serves /metrics only with "
            r"levante\.telemetry\.metrics\.enabled"
        ),
    ),
    "sample ratio above one": (
        {"levante": {"telemetry": {"tracing": {"sample_ratio": 2}}}},
        helm.HelmValuesError,
        r"at '/levante/telemetry/tracing/sample_ratio': maximum: got 2, want 1",
    ),
    "otlp endpoint without port": (
        {"levante": {"telemetry": {"tracing": {"otlp_endpoint": "otel-collector"}}}},
        helm.HelmValuesError,
        r"at '/levante/telemetry/tracing/otlp_endpoint': '.*' does not match pattern",
    ),
    "unknown dashboard key": (
        {"monitoring": {"grafanaDashboard": {"folder": "Levante"}}},
        helm.HelmValuesError,
        r"at '/monitoring/grafanaDashboard': additional properties 'folder' not allowed",
    ),
    "inline tenant api key": (
        {"levante": {"frontdoor": {"tenants": [{"name": "acme", "api_key": "s3cret"}]}}},
        helm.HelmRenderError,
        r"levante\.frontdoor\.tenants\[0\]\.api_key: would be written into a ConfigMap",
    ),
    "tls without a secret": (
        {"tls": {"enabled": True}},
        helm.HelmRenderError,
        r"tls\.secretName: required when tls\.enabled is true",
    ),
    "mutual tls without server tls": (
        {"tls": {"clientCA": {"enabled": True}}, "frontdoor": {"probes": {"handler": "tcp"}}},
        helm.HelmRenderError,
        r"tls\.clientCA\.enabled: mutual TLS needs server TLS too",
    ),
    "mutual tls with grpc probes": (
        {"tls": {"enabled": True, "secretName": "fd-tls", "clientCA": {"enabled": True}}},
        helm.HelmRenderError,
        r"frontdoor\.probes\.handler: grpc cannot pass with tls\.clientCA\.enabled",
    ),
    "peer tls file without the peer secret": (
        {
            "levante": {
                "regions": {
                    "peers": [
                        {
                            "name": "us-east",
                            "target": "us-east.example.net:50051",
                            "tls_ca": "/etc/levante/peer-tls/ca.crt",
                        }
                    ]
                }
            }
        },
        helm.HelmRenderError,
        r"levante\.regions\.peers\[0\]\.tls_ca: set, but peerTLS\.secretName is empty",
    ),
    "peer tls file outside the peer secret": (
        {
            "peerTLS": {"secretName": "peer-tls"},
            "levante": {
                "regions": {
                    "peers": [{"name": "us-east", "target": "us-east.example.net:50051", "tls_ca": "/certs/ca.crt"}]
                }
            },
        },
        helm.HelmRenderError,
        r"levante\.regions\.peers\[0\]\.tls_ca: \"/certs/ca\.crt\" is not in /etc/levante/peer-tls/",
    ),
    "budget no drain can meet": (
        {"frontdoor": {"replicas": 1}},
        helm.HelmRenderError,
        r"frontdoor\.pdb\.minAvailable: 1 with frontdoor\.replicas 1 lets no node drain evict",
    ),
    "duplicate worker group": (
        {"rayCluster": {"workerGroups": [gpu_group(1, 4), gpu_group(1, 4)]}},
        helm.HelmRenderError,
        r"rayCluster\.workerGroups: the name \"gpu\" is used twice",
    ),
    # The engine backend against the replica (the rules of cluster/config.py, at render time).
    "unknown engine backend": (
        {"levante": {"engine": {"backend": "trtllm"}}},
        helm.HelmValuesError,
        r"at '/levante/engine/backend': value must be one of 'native', 'vllm'",
    ),
    "misspelt vllm key": (
        {"levante": {"engine": {"vllm": {"tensor_parallel": 2}}}},
        helm.HelmValuesError,
        r"at '/levante/engine/vllm': additional properties 'tensor_parallel' not allowed",
    ),
    "vllm extra arg that is not a scalar": (
        {"levante": {"engine": {"vllm": {"extra_args": {"speculative_config": {"method": "eagle"}}}}}},
        helm.HelmValuesError,
        r"at '/levante/engine/vllm/extra_args/speculative_config'",
    ),
    "device that is no device": (
        {"levante": {"engine": {"model": {"device": "gpu"}}}},
        helm.HelmValuesError,
        r"at '/levante/engine/model/device': '.*' does not match pattern",
    ),
    "vllm keys with the native engine": (
        {"levante": {"engine": {"backend": "native"}}},
        helm.HelmRenderError,
        (
            r"levante\.engine\.vllm: read only with levante\.engine\.backend vllm \(backend is "
            r"\"native\"\); .* \(enable_expert_parallel, gpu_memory_utilization, tensor_parallel_size\)"
        ),
    ),
    "expert-parallel ranks with vllm": (
        {"levante": {"replica": {"ep_size": 4}}},
        helm.HelmRenderError,
        r"levante\.replica\.ep_size: must be 1 with levante\.engine\.backend vllm, got 4",
    ),
    "vllm over several CPU devices": (
        {"levante": {"replica": {"accelerator": "cpu"}}, "rayCluster": {"workerGroups": [gpu_group(1, 0, name="cpu")]}},
        helm.HelmRenderError,
        (
            r"levante\.engine\.vllm\.tensor_parallel_size: tensor 4 x pipeline 1 x data 1 parallel = 4 "
            r"devices per engine needs levante\.replica\.accelerator gpu"
        ),
    ),
    "cuda device on cpu bundles": (
        native(
            {
                "levante": {"engine": {"model": {"device": "cuda:0"}}, "replica": {"accelerator": "cpu"}},
                "rayCluster": {"workerGroups": [gpu_group(1, 0, name="cpu")]},
            }
        ),
        helm.HelmRenderError,
        r"levante\.engine\.model\.device: \"cuda:0\" needs levante\.replica\.accelerator gpu",
    ),
    "cpu device on gpu bundles": (
        {"levante": {"engine": {"model": {"device": "cpu"}}}},
        helm.HelmRenderError,
        r"levante\.engine\.model\.device: \"cpu\" contradicts levante\.replica\.accelerator gpu",
    ),
    # Capacity, backend vllm: num_replicas x tensor x pipeline x data parallel GPU workers.
    "not enough GPUs for vllm": (
        {"levante": {"replica": {"num_replicas": 2}}},
        helm.HelmRenderError,
        (
            r"levante\.replica: 2 replica\(s\) x engine\.vllm world size 4 \(tensor 4 x pipeline 1 x data 1 parallel\) = 8 "
            r"vLLM workers \(one GPU and 2 CPU each\), but rayCluster\.workerGroups hold 4 \(gpu: 1 pod\(s\) x 4 worker\(s\)\); "
            r".* lower replica\.num_replicas or engine\.vllm\.tensor_parallel_size"
        ),
    ),
    "vllm world size counts pipeline and data parallel": (
        {
            "levante": {
                "engine": {"vllm": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "data_parallel_size": 2}}
            }
        },
        helm.HelmRenderError,
        r"1 replica\(s\) x engine\.vllm world size 8 \(tensor 2 x pipeline 2 x data 2 parallel\) = 8 vLLM workers",
    ),
    "vllm strict pack across pods": (
        {
            "levante": {"replica": {"placement_strategy": "STRICT_PACK"}},
            "rayCluster": {"workerGroups": [gpu_group(2, 2, cpu=8)]},
        },
        helm.HelmRenderError,
        r"STRICT_PACK puts all 4 workers of a replica on one pod, but the worker pods fit only 0",
    ),
    # Capacity, backend native: num_replicas x ep_size ranks, one GPU (and cpus_per_rank CPUs) each.
    "not enough GPUs": (
        native({"levante": {"replica": {"num_replicas": 2, "ep_size": 4}}}),
        helm.HelmRenderError,
        (
            r"levante\.replica: 2 replica\(s\) x ep_size 4 = 8 expert-parallel ranks \(one GPU and 2 CPU each\), "
            r"but rayCluster\.workerGroups hold 4 \(gpu: 1 pod\(s\) x 4 rank\(s\)\)"
        ),
    ),
    "not enough CPUs for the GPU ranks": (
        native({"rayCluster": {"workerGroups": [gpu_group(1, 4, cpu=6)]}}),
        helm.HelmRenderError,
        r"= 4 expert-parallel ranks .* hold 3 \(gpu: 1 pod\(s\) x 3 rank\(s\)\)",
    ),
    "cpu ranks on too few CPUs": (
        native(
            {
                "levante": {"replica": {"accelerator": "cpu", "cpus_per_rank": 4.0, "num_replicas": 2}},
                "rayCluster": {"workerGroups": [gpu_group(2, 0, cpu=8, name="cpu")]},
            }
        ),
        helm.HelmRenderError,
        r"= 8 expert-parallel ranks \(4 CPU each\), but rayCluster\.workerGroups hold 4 \(cpu: 2 pod\(s\) x 2 rank\(s\)\)",
    ),
    "strict pack across pods": (
        native(
            {
                "levante": {"replica": {"placement_strategy": "STRICT_PACK"}},
                "rayCluster": {"workerGroups": [gpu_group(2, 2, cpu=8)]},
            }
        ),
        helm.HelmRenderError,
        r"STRICT_PACK puts all 4 ranks of a replica on one pod, but the worker pods fit only 0",
    ),
    "strict spread on one pod": (
        native({"levante": {"replica": {"placement_strategy": "STRICT_SPREAD"}}}),
        helm.HelmRenderError,
        r"STRICT_SPREAD puts each of a replica's 4 ranks on its own pod, but only 1 worker pod",
    ),
}


@pytest.mark.parametrize("patch, error, message", list(BAD.values()), ids=list(BAD))
def test_bad_values_fail_with_a_clear_message(patch, error, message):
    values = merged(ONE_REGION, patch)
    with pytest.raises(error, match=message):
        render(values)
    if error is helm.HelmValuesError:  # `helm lint` checks the schema too (its lint mode only logs `fail`)
        assert any(re.search(message, e) for e in lint(values)["errors"]), lint(values)


GOOD = {
    "vllm: two replicas of tensor parallel 2 on one pod": {
        "levante": {
            "engine": {"vllm": {"tensor_parallel_size": 2}},
            "replica": {"num_replicas": 2, "placement_strategy": "STRICT_PACK"},
        }
    },
    "vllm: pipeline parallel over two pods": {
        "levante": {"engine": {"vllm": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}}},
        "rayCluster": {"workerGroups": [gpu_group(2, 2, cpu=8)]},
    },
    "vllm on one CPU device": {
        "levante": {
            "engine": {"vllm": {"tensor_parallel_size": 1, "gpu_memory_utilization": None}},
            "replica": {"accelerator": "cpu", "cpus_per_rank": 8.0},
        },
        "rayCluster": {"workerGroups": [gpu_group(1, 0, name="cpu")]},
    },
    "vllm on cuda": {"levante": {"engine": {"model": {"device": "cuda"}}}},
    "native on GPUs": native({}),
    "exactly enough GPUs": native({"levante": {"replica": {"num_replicas": 2, "ep_size": 2}}}),
    "capacity from two groups": native(
        {
            "levante": {"replica": {"num_replicas": 3, "ep_size": 4}},
            "rayCluster": {"workerGroups": [gpu_group(2, 4), gpu_group(2, 2, name="small")]},
        }
    ),
    "cpu ranks": native(
        {
            "levante": {"replica": {"accelerator": "cpu", "cpus_per_rank": 4.0}},
            "rayCluster": {"workerGroups": [gpu_group(2, 0, cpu=16, name="cpu")]},
        }
    ),
    "strict spread over enough pods": native(
        {
            "levante": {"replica": {"placement_strategy": "STRICT_SPREAD", "ep_size": 2}},
            "rayCluster": {"workerGroups": [gpu_group(2, 1, cpu=4)]},
        }
    ),
    "mutual tls with tcp probes": {
        "tls": {"enabled": True, "secretName": "fd-tls", "clientCA": {"enabled": True}},
        "frontdoor": {"probes": {"handler": "tcp"}},
    },
}


@pytest.mark.parametrize("patch", list(GOOD.values()), ids=list(GOOD))
def test_values_at_the_limits_render(patch):
    """The checks above refuse only what cannot work: the boundary cases render, lint clean, and
    the cluster config they render is one Levante loads (the chart's rules are the config's)."""
    values = merged(ONE_REGION, patch)
    docs = manifests(render(values))
    assert lint(values)["errors"] == []
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config_from_dict(yaml.safe_load(cm["data"]["cluster.yaml"]), "ConfigMap cluster.yaml")


def test_a_broken_template_fails_the_render(tmp_path):
    chart = tmp_path / "levante"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "broken.yaml").write_text("{{ .Values.levante.region | nosuchfunction }}\n")
    with pytest.raises(helm.HelmError, match="nosuchfunction"):
        render(ONE_REGION, chart)


def test_a_template_that_renders_bad_yaml_fails_the_manifest_parse(tmp_path):
    chart = tmp_path / "levante"
    shutil.copytree(CHART, chart)
    service = chart / "templates" / "frontdoor-service.yaml"
    service.write_text(service.read_text().replace("  type: {{", "    type: {{"))  # mis-indented
    with pytest.raises(yaml.YAMLError):
        manifests(render(ONE_REGION, chart))


# -- the chart follows cluster/config.py ---------------------------------------------------------


def _schema_type(node: dict) -> str:
    """The schema node's type in describe_schema()'s words ("int", "str | null", "list of str", ...)."""
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    names = []
    for t in types:
        if t == "array":
            item = node["items"]
            names.append("list of mapping" if item["type"] == "object" else f"list of {_schema_type(item)}")
        elif t == "object" and "properties" in node:
            names.append("mapping")
        elif t == "object":
            names.append(f"map str -> {_schema_type(node['additionalProperties'])}")
        else:
            names.append({"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "null"}[t])
    return " | ".join(names)


def _schema_keys(node: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for name, child in node["properties"].items():
        key = f"{prefix}.{name}" if prefix else name
        if child.get("type") == "object" and "properties" in child:
            assert child.get("additionalProperties") is False, f"{key}: unknown keys must be refused"
            out[key] = "section"
            out.update(_schema_keys(child, key))
            continue
        out[key] = _schema_type(child)
        if child.get("type") == "array" and child["items"].get("type") == "object":
            assert child["items"].get("additionalProperties") is False, f"{key}[]: unknown keys must be refused"
            out.update(_schema_keys(child["items"], f"{key}[]"))
    return out


def test_schema_levante_section_has_every_config_key_with_its_type():
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_chart = _schema_keys(schema["properties"]["levante"])
    in_config = {e.key: e.type for e in describe_schema()}
    assert sorted(set(in_config) - set(in_chart)) == [], "config keys missing from values.schema.json"
    assert sorted(set(in_chart) - set(in_config)) == [], "values.schema.json keys the config does not have"
    assert {k: v for k, v in in_chart.items() if in_config[k] != v} == {}, "types differ (chart: config)"


def test_values_yaml_defaults_are_the_config_defaults():
    """values.yaml repeats some config defaults (the templates read them); only deliberate ones differ."""
    # Kubernetes runs replicas on GPUs, with vLLM (the GPU production path), local runs on CPUs with
    # the native engine; a pod's metrics port is its own, while regions started on one machine would share it.
    # HTTP on 8080: Serve's HTTP proxy may hold 8000 on every Ray node, the front door's pod included.
    deliberate = {
        "replica.accelerator": "gpu",
        "engine.backend": "vllm",
        "telemetry.metrics.enabled": True,
        "frontdoor.http.port": 8080,
    }
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["levante"]
    config = config_to_dict(ClusterConfig())

    def leaves(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and v:
                yield from leaves(v, key)
            else:
                yield key, v

    differ = {}
    for key, value in leaves(defaults):
        node = config
        for part in key.split("."):
            node = node[part]
        if value != node and deliberate.get(key) != value:
            differ[key] = (value, node)
    assert differ == {}, "values.yaml: config default differs (values.yaml, config)"
    assert "replica.ep_size" in dict(leaves(defaults))  # the walk saw the keys the templates read


def test_ray_version_is_the_one_levante_pins():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayVersion"] == importlib.metadata.version("ray")


def test_app_version_is_the_levante_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert chart["appVersion"] == tomllib.load(f)["project"]["version"]
