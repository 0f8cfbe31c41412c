"""Every example values file renders with a real Helm engine, lints clean, and renders valid objects.

Valid here means: Kubernetes' own kinds pass `kubernetes-validate --strict` for the newest Kubernetes
it knows; the RayService passes KubeRay's CRD schema (unknown fields rejected) and its pod templates
pass Kubernetes' PodTemplate schema; the cluster config the chart builds loads with Levante's own
loader, is the same mapping in serveConfigV2 and in the front door's ConfigMap, and is what Ray Serve
and `cluster.serve.app:app_builder` accept. The wiring between objects (ports, selectors, mounts, the
head Service name) is checked by name, since no cluster is here to notice a mismatch.
"""

from __future__ import annotations

import copy
import json
import posixpath

import pytest

from cluster.config_loader import config_from_dict, load_config
from tests.helm.helpers import (
    CHART,
    EXAMPLES,
    KUBE_VERSION,
    NAMESPACE,
    by_kind,
    container,
    crd_errors,
    example_values,
    kube_errors,
    lint,
    manifests,
    merged,
    one,
    pod_templates,
    render,
    selects,
    serve_config,
)

CUSTOM_KINDS = {"RayService", "ServiceMonitor"}
ONE_REGION = CHART / "examples" / "one-region.yaml"


@pytest.fixture(scope="module", params=EXAMPLES, ids=[p.name for p in EXAMPLES])
def example(request):
    values = example_values(request.param)
    return values, manifests(render(values))


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES} >= {"one-region.yaml", "second-region.yaml", "tls.yaml", "mistral-small-4.yaml"}


def test_gpu_examples_use_the_vllm_backend(example):
    """The GPU path the chart recommends: vLLM, one engine per replica over its GPUs, ep_size 1."""
    _values, docs = example
    cfg = load_from_configmap(docs)
    assert cfg.replica.accelerator == "gpu" and cfg.engine.backend == "vllm" and cfg.replica.ep_size == 1
    assert cfg.engine.vllm.gpu_memory_utilization  # else vLLM's KV cache is engine.cache's 512 MiB
    # The worker pods offer Ray at least num_replicas x world size GPUs, and each pod's Ray GPUs are its limit.
    groups = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = 0
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(g["rayStartParams"]["num-gpus"]) == limits.get("nvidia.com/gpu", 0)
        gpus += g["replicas"] * int(g["rayStartParams"]["num-gpus"])
    assert gpus >= cfg.replica.num_replicas * cfg.engine.vllm.world_size


def test_mistral_small_4_example_is_the_two_gpu_recipe():
    docs = manifests(render(example_values(CHART / "examples" / "mistral-small-4.yaml")))
    cfg = load_from_configmap(docs)
    v = cfg.engine.vllm
    assert (v.tensor_parallel_size, v.pipeline_parallel_size, v.data_parallel_size) == (2, 1, 1)
    assert v.attention_backend == "FLASH_ATTN_MLA" and v.gpu_memory_utilization == 0.9
    assert cfg.engine.model.model == "/models/Mistral-Small-4-119B-2603" and cfg.engine.model.max_model_len == 131072
    assert cfg.replica.placement_strategy == "STRICT_PACK"
    (group,) = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = container(group["template"]["spec"], "ray-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert posixpath.dirname(cfg.engine.model.model) in mounts and "/dev/shm" in mounts


def test_lint_is_clean(example):
    values, _ = example
    report = lint(values)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; 1 is "info"
    assert report["errors"] == [] and problems == [], report


def test_renders_the_expected_objects(example):
    _, docs = example
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "RayService",
        "Service",
    ]
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs)


def test_kubernetes_objects_pass_strict_schemas(example):
    _, docs = example
    errors = {f"{d['kind']}/{d['metadata']['name']}": kube_errors(d) for d in docs if d["kind"] not in CUSTOM_KINDS}
    assert errors and not any(errors.values()), f"against Kubernetes {KUBE_VERSION}: {errors}"


def test_rayservice_passes_the_kuberay_crd(example):
    _, docs = example
    rs = one(docs, "RayService")
    assert crd_errors(rs) == []
    for group, template in pod_templates(rs):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"check-{group}"},
            "template": template,
        }
        assert kube_errors(pod_template) == [], group


def test_serve_config_and_configmap_load_as_one_cluster_config(example, tmp_path):
    values, docs = example
    serve = serve_config(one(docs, "RayService"))
    (app,) = serve["applications"]
    region = values["levante"]["region"]
    assert app["name"] == f"levante-{region}"  # what the front door (cluster.serve.app.app_name) attaches to
    assert app["import_path"] == "cluster.serve.app:app_builder"
    from_serve = config_from_dict(app["args"]["config"], "serveConfigV2 args.config")

    cm = one(docs, "ConfigMap")
    path = tmp_path / "cluster.yaml"
    path.write_text(cm["data"]["cluster.yaml"], encoding="utf-8")
    from_configmap = load_config(path)  # the strict file loader the front door uses (duplicate keys, ...)

    assert from_serve == from_configmap
    assert from_serve.region == region
    assert from_serve.frontdoor.host == "0.0.0.0"
    assert (from_serve.ray.address, from_serve.ray.deploy) == ("auto", False)
    r = values["levante"]["replica"]
    assert (from_serve.replica.num_replicas, from_serve.replica.ep_size) == (r["num_replicas"], r.get("ep_size", 1))
    assert from_serve.engine.backend == values["levante"]["engine"].get(
        "backend", "vllm"
    )  # vllm: values.yaml's default
    assert [p.name for p in from_serve.regions.peers] == [
        p["name"] for p in values["levante"].get("regions", {}).get("peers", [])
    ]


def test_serve_config_is_what_ray_serve_and_the_app_builder_accept(example):
    from ray.serve.deployment import Application
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    from cluster.serve.app import app_builder

    _, docs = example
    serve = serve_config(one(docs, "RayService"))
    ServeDeploySchema.model_validate(serve)  # what the dashboard does with serveConfigV2
    (app,) = serve["applications"]
    # Serve ignores keys it does not know: a misspelt one would be lost silently, so name them all.
    assert set(serve) <= set(ServeDeploySchema.model_fields)
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    for override in app["deployments"]:
        assert set(override) <= set(DeploymentSchema.model_fields)
        assert set(override["ray_actor_options"]) <= set(RayActorOptionsSchema.model_fields)
    built = app_builder(app["args"])  # builds the deployments; needs no running Ray

    deployments, todo = {}, [built]
    while todo:
        d = todo.pop()._bound_deployment
        deployments[d.name] = d
        todo.extend(a for a in (*d.init_args, *d.init_kwargs.values()) if isinstance(a, Application))
    # The overrides name real deployments and repeat the code's CPUs, GPUs and runtime_env (Serve replaces
    # ray_actor_options whole).
    for override in app["deployments"]:
        assert override["name"] in deployments, (override["name"], sorted(deployments))
        code = deployments[override["name"]].ray_actor_options
        assert override["ray_actor_options"]["num_cpus"] == code.get("num_cpus")
        assert override["ray_actor_options"]["num_gpus"] == code.get("num_gpus")
        assert override["ray_actor_options"]["runtime_env"] == code.get("runtime_env")


def test_router_and_replicas_are_kept_on_ray_pods(example):
    _, docs = example
    rs = one(docs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for override in serve_config(rs)["applications"][0]["deployments"]:
        selector = override["ray_actor_options"]["label_selector"]
        assert all(selects(selector, g["labels"]) for g in groups)
    # The front door's Ray node carries no such label (it is started with none).
    args = container(one(docs, "Deployment")["spec"]["template"]["spec"], "frontdoor")["args"][0]
    assert "--labels" not in args and "--num-cpus=0" in args and "--num-gpus=0" in args


def test_frontdoor_joins_the_rayservice_head(example):
    _, docs = example
    rs = one(docs, "RayService")
    fd = container(one(docs, "Deployment")["spec"]["template"]["spec"], "frontdoor")
    env = {e["name"]: e.get("value") for e in fd["env"]}
    # KubeRay names the RayService's head Service "<RayService name>-head-svc" (GenerateHeadServiceName).
    assert env["LEVANTE_RAY_GCS"] == f"{rs['metadata']['name']}-head-svc.{NAMESPACE}.svc:6379"
    head = container(rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"], "ray-head")
    assert {"name": "gcs-server", "containerPort": 6379} in head["ports"]  # declared ports are the Service's
    assert 'ray start --address="${LEVANTE_RAY_GCS}"' in fd["args"][0]
    assert "exec levante serve --config /etc/levante/cluster.yaml" in fd["args"][0]


def test_frontdoor_port_probes_service_and_selectors_agree(example):
    values, docs = example
    port = values["levante"].get("frontdoor", {}).get("port", 50051)
    dep = one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    fd = container(dep["spec"]["template"]["spec"], "frontdoor")
    assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in fd["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handler = fd[probe]
        if values.get("frontdoor", {}).get("probes", {}).get("handler", "grpc") == "grpc":
            assert handler["grpc"]["port"] == port and handler["grpc"]["service"] == ""
        else:
            assert handler["tcpSocket"] == {"port": "grpc"}

    svc = one(docs, "Service")
    assert {"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP"} in svc["spec"]["ports"]
    assert selects(svc["spec"]["selector"], pod_labels)
    assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)

    cm_volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert cm_volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]


def test_network_policies_select_the_pods_and_open_the_grpc_port(example):
    values, docs = example
    port = values["levante"].get("frontdoor", {}).get("port", 50051)
    fd_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ray_labels = [t["metadata"]["labels"] for _, t in pod_templates(one(docs, "RayService"))]
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}
    fd_policy = [p for p in policies.values() if selects(p["spec"]["podSelector"]["matchLabels"], fd_labels)]
    ray_policy = [
        p
        for p in policies.values()
        if all(selects(p["spec"]["podSelector"]["matchLabels"], labels) for labels in ray_labels)
    ]
    assert len(fd_policy) == 1 and len(ray_policy) == 1 and fd_policy != ray_policy
    grpc_rules = [r for r in fd_policy[0]["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in r.get("ports", [])]
    assert grpc_rules
    # The door and the Ray pods are one Ray cluster: each policy admits the other side on every port.
    for policy, other in ((fd_policy[0], ray_labels[0]), (ray_policy[0], fd_labels)):
        assert any(
            "ports" not in r
            and any(selects(f.get("podSelector", {}).get("matchLabels", {}), other) for f in r.get("from", []))
            for r in policy["spec"]["ingress"]
        )


def test_tls_paths_point_into_the_mounted_secrets(example):
    values, docs = example
    cfg = load_from_configmap(docs)
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container(spec, "frontdoor")["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}

    def check(path):
        directory, filename = posixpath.split(path)
        assert directory in mounts, f"{path}: nothing mounted at {directory}"
        secret = volumes[mounts[directory]]["secret"]
        assert secret["secretName"]
        if "items" in secret:  # fixed file names: the file must be one of them
            assert filename in [i["path"] for i in secret["items"]], path

    tls = cfg.frontdoor.tls
    assert tls.enabled == values.get("tls", {}).get("enabled", False)
    for path in (tls.cert, tls.key, tls.client_ca):
        if path:
            check(path)
    for peer in cfg.regions.peers:
        for path in (peer.tls_ca, peer.tls_cert, peer.tls_key):
            if path:
                check(path)


def load_from_configmap(docs):
    import yaml

    return config_from_dict(yaml.safe_load(one(docs, "ConfigMap")["data"]["cluster.yaml"]), "ConfigMap cluster.yaml")


def test_the_validators_reject_an_unknown_field():
    """The two checks above can fail: a misspelt field is caught in a built-in kind and in the RayService."""
    docs = manifests(render(example_values(ONE_REGION)))
    dep = copy.deepcopy(one(docs, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert any("readinessProbes" in e for e in kube_errors(dep))
    rs = copy.deepcopy(one(docs, "RayService"))
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in crd_errors(rs))
    rs = copy.deepcopy(one(docs, "RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in crd_errors(rs))


def test_service_monitor_when_enabled():
    values = merged(
        example_values(ONE_REGION),
        {
            "monitoring": {
                "serviceMonitor": {"enabled": True, "port": 9464, "labels": {"release": "kube-prometheus-stack"}}
            }
        },
    )
    docs = manifests(render(values))
    sm = one(docs, "ServiceMonitor")
    assert crd_errors(sm) == []
    svc = one(docs, "Service")
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"} in svc["spec"]["ports"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    fd = container(one(docs, "Deployment")["spec"]["template"]["spec"], "frontdoor")
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in fd["ports"]
    assert all(kube_errors(d) == [] for d in docs if d["kind"] not in CUSTOM_KINDS)
    assert lint(values)["errors"] == []


def test_metrics_port_reaches_the_config_the_pod_the_service_and_the_policy():
    """/metrics is on by default on Kubernetes: the door's config listens on every interface at the
    port the container, the Service and the NetworkPolicy name; off, none of them mention it."""
    docs = manifests(
        render(merged(example_values(ONE_REGION), {"levante": {"telemetry": {"metrics": {"port": 9500}}}}))
    )
    metrics = load_from_configmap(docs).telemetry.metrics
    assert (metrics.enabled, metrics.host, metrics.port) == (True, "0.0.0.0", 9500)
    fd = container(one(docs, "Deployment")["spec"]["template"]["spec"], "frontdoor")
    assert {"name": "metrics", "containerPort": 9500, "protocol": "TCP"} in fd["ports"]
    assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"} in one(docs, "Service")[
        "spec"
    ]["ports"]
    fd_policy = [p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-frontdoor")]
    assert any({"port": 9500, "protocol": "TCP"} in r.get("ports", []) for r in fd_policy[0]["spec"]["ingress"])

    off = manifests(
        render(merged(example_values(ONE_REGION), {"levante": {"telemetry": {"metrics": {"enabled": False}}}}))
    )
    fd = container(one(off, "Deployment")["spec"]["template"]["spec"], "frontdoor")
    assert [p["name"] for p in fd["ports"]] == ["grpc", "http"]  # HTTP is on by default (tests/helm/test_http.py)
    assert [p["name"] for p in one(off, "Service")["spec"]["ports"]] == ["grpc", "http"]
    assert load_from_configmap(off).telemetry.metrics.enabled is False


def test_grafana_dashboard_configmap_when_enabled():
    values = example_values(ONE_REGION)
    assert not [
        d for d in by_kind(manifests(render(values)), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")
    ]
    values = merged(
        values,
        {
            "monitoring": {
                "grafanaDashboard": {
                    "enabled": True,
                    "namespace": "monitoring",
                    "annotations": {"grafana_folder": "Levante"},
                }
            }
        },
    )
    docs = manifests(render(values))
    (board,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert board["metadata"]["namespace"] == "monitoring"
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    assert board["metadata"]["annotations"] == {"grafana_folder": "Levante"}
    shipped = json.loads((CHART / "dashboards" / "levante.json").read_text())
    assert json.loads(board["data"]["levante.json"]) == shipped and shipped["panels"]
    assert kube_errors(board) == [] and lint(values)["errors"] == []


def test_server_tls_probes_use_grpc_tls_mode():
    """Server TLS without client certificates: the kubelet's gRPC probe dials TLS (Kubernetes 1.37 `mode`)."""
    values = merged(example_values(ONE_REGION), {"tls": {"enabled": True, "secretName": "fd-tls"}})
    docs = manifests(render(values))
    fd = container(one(docs, "Deployment")["spec"]["template"]["spec"], "frontdoor")
    assert fd["readinessProbe"]["grpc"] == {"port": 50051, "service": "", "mode": "TLS"}
    assert kube_errors(one(docs, "Deployment")) == []
    assert load_from_configmap(docs).frontdoor.tls.client_ca is None


def test_ray_token_auth_reaches_the_cluster_and_the_door():
    values = merged(example_values(ONE_REGION), {"rayCluster": {"authSecretName": "ray-token"}})
    docs = manifests(render(values))
    rs = one(docs, "RayService")
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    assert crd_errors(rs) == []
    env = {e["name"]: e for e in container(one(docs, "Deployment")["spec"]["template"]["spec"], "frontdoor")["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-token", "key": "auth_token"}


def test_startup_probe_outlasts_the_first_model_load():
    values = merged(example_values(ONE_REGION), {"levante": {"replica": {"load_timeout_s": 3600.0}}})
    fd = container(one(manifests(render(values)), "Deployment")["spec"]["template"]["spec"], "frontdoor")
    probe = fd["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 3600 + 60
