"""The chart's OpenAI-compatible HTTP port: on by default, it reaches the door's config, its container,
the Service and the NetworkPolicy; null turns all of them off; the chart owns its host."""

from __future__ import annotations

import pytest

from cluster.config_loader import config_from_dict
from tests.helm.helpers import CHART, by_kind, container, example_values, manifests, merged, one, render

ONE_REGION = example_values(CHART / "examples" / "one-region.yaml")


def _config(docs):
    import yaml

    return config_from_dict(yaml.safe_load(one(docs, "ConfigMap")["data"]["cluster.yaml"]), "ConfigMap cluster.yaml")


def _policy_ports(docs) -> list[dict]:
    policy = next(p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-frontdoor"))
    return [port for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])]


def test_http_port_reaches_the_config_the_pod_the_service_and_the_policy():
    docs = manifests(render(merged(ONE_REGION, {"levante": {"frontdoor": {"http": {"port": 8081}}}})))
    http = _config(docs).frontdoor.http
    assert (http.port, http.host) == (8081, None)  # null host: the door's, 0.0.0.0 in the pod
    assert _config(docs).frontdoor.host == "0.0.0.0"
    fd = container(one(docs, "Deployment")["spec"]["template"]["spec"], "frontdoor")
    assert {"name": "http", "containerPort": 8081, "protocol": "TCP"} in fd["ports"]
    service = one(docs, "Service")["spec"]["ports"]
    assert {"name": "http", "port": 8081, "targetPort": "http", "protocol": "TCP"} in service
    assert {"port": 8081, "protocol": "TCP"} in _policy_ports(docs)


def test_the_charts_default_is_8080_and_null_turns_http_off():
    on = manifests(render(ONE_REGION))
    assert _config(on).frontdoor.http.port == 8080
    off = manifests(render(merged(ONE_REGION, {"levante": {"frontdoor": {"http": {"port": None}}}})))
    assert _config(off).frontdoor.http.port is None
    fd = container(one(off, "Deployment")["spec"]["template"]["spec"], "frontdoor")
    assert "http" not in [p["name"] for p in fd["ports"]]
    assert "http" not in [p["name"] for p in one(off, "Service")["spec"]["ports"]]
    assert {"port": 8080, "protocol": "TCP"} not in _policy_ports(off)


def test_the_chart_owns_the_http_host():
    with pytest.raises(Exception, match=r"levante\.frontdoor\.http\.host: set by the chart"):
        render(merged(ONE_REGION, {"levante": {"frontdoor": {"http": {"host": "10.0.0.1"}}}}))
