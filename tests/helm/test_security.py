"""Secure by default: the chart refuses an open front door unless told, peer keys travel only over
TLS, the Ray dashboard is reachable only from the KubeRay operator's namespace, and the default
image is the one `make image` builds."""

from __future__ import annotations

import helm_python as helm
import pytest
import yaml

from tests.helm.helpers import CHART, by_kind, example_values, lint, manifests, merged, one, pod_templates, render

ONE_REGION = example_values(CHART / "examples" / "one-region.yaml")
# one-region.yaml without its opt-out: what a release gets from the chart's defaults.
STRICT = merged(ONE_REGION, {"security": None})
TLS = {"tls": {"enabled": True, "secretName": "fd-tls"}}
TENANT = {
    "levante": {"frontdoor": {"tenants": [{"name": "acme", "api_key_env": "LEVANTE_KEY_ACME"}]}},
    "frontdoor": {"env": [{"name": "LEVANTE_KEY_ACME", "valueFrom": {"secretKeyRef": {"name": "k", "key": "acme"}}}]},
}
MUTUAL = {"tls": {"clientCA": {"enabled": True}}, "frontdoor": {"probes": {"handler": "tcp"}}}
PEER = {"name": "us-east", "target": "levante-us-east.example.net:50051", "api_key_env": "LEVANTE_KEY_US_EAST"}


def notes(values):
    rendered = render(values)
    (text,) = [t for name, t in rendered.items() if name.endswith("NOTES.txt")]
    return text


REFUSED = {
    "plaintext by default": (STRICT, r"security: the front door would serve plaintext; set tls\.enabled"),
    "plaintext even with tenants": (merged(STRICT, TENANT), r"security: the front door would serve plaintext"),
    "tls without any caller identity": (
        merged(STRICT, TLS),
        r"security: the front door would accept any caller; set levante\.frontdoor\.tenants .* or tls\.clientCA",
    ),
    "a peer key without tls": (
        merged(ONE_REGION, {"levante": {"regions": {"peers": [PEER]}}}),
        r"levante\.regions\.peers\[0\]\.api_key_env: the key would travel in plaintext; set levante\.regions\.peers\[0\]\.tls_ca",
    ),
}


@pytest.mark.parametrize("values, message", list(REFUSED.values()), ids=list(REFUSED))
def test_an_open_release_is_refused_with_the_values_to_set(values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_a_peer_key_without_tls_is_refused_even_when_insecure_is_allowed():
    """security.allowInsecure covers the door's own callers; a key sent in the clear is never accepted
    (the cluster config refuses it too)."""
    values = merged(ONE_REGION, {"levante": {"regions": {"peers": [PEER]}}})
    assert values["security"]["allowInsecure"] is True
    with pytest.raises(helm.HelmRenderError, match=r"peers\[0\]\.api_key_env: the key would travel in plaintext"):
        render(values)
    peer = {**PEER, "tls_ca": "/etc/levante/peer-tls/ca.crt"}
    render(merged(values, {"levante": {"regions": {"peers": [peer]}}, "peerTLS": {"secretName": "peer-tls"}}))


@pytest.mark.parametrize(
    "patch", [merged(TLS, TENANT), merged(TLS, MUTUAL)], ids=["tls and api keys", "mutual tls without tenants"]
)
def test_tls_with_client_identity_renders_without_the_opt_out(patch):
    values = merged(STRICT, patch)
    docs = manifests(render(values))
    assert one(docs, "RayService") and lint(values)["errors"] == []
    assert "WARNING" not in notes(values)


def test_notes_warn_when_insecure_is_allowed():
    text = notes(ONE_REGION)
    assert "WARNING: security.allowInsecure is true" in text
    assert "plaintext (tls.enabled is false)" in text and "unauthenticated (no levante.frontdoor.tenants" in text
    assert "Any pod in the cluster can reach it" in text and "LoadBalancer" not in text
    assert "outside the cluster" in notes(merged(ONE_REGION, {"frontdoor": {"service": {"type": "LoadBalancer"}}}))
    # Only what is really open is listed.
    text = notes(merged(ONE_REGION, TLS))
    assert "unauthenticated" in text and "plaintext (tls.enabled" not in text
    restricted = {"networkPolicy": {"frontdoorFrom": [{"podSelector": {"matchLabels": {"app": "gateway"}}}]}}
    assert "Any pod in the cluster" not in notes(merged(ONE_REGION, restricted))
    # Secure anyway: the opt-out is pointless, and the notes say it can go.
    text = notes(merged(ONE_REGION, merged(TLS, TENANT)))
    assert "WARNING" not in text and "it can be removed" in text


def _rules_reaching(policy, port):
    """The ingress rules of ``policy`` that admit ``port`` (a rule without ports admits every port)."""
    return [r for r in policy["spec"]["ingress"] if "ports" not in r or any(p["port"] == port for p in r["ports"])]


@pytest.mark.parametrize("namespace", [None, "ray-operators"], ids=["default", "set"])
def test_ray_dashboard_is_reachable_only_from_the_kuberay_operator_namespace(namespace):
    patch = {} if namespace is None else {"networkPolicy": {"kuberayOperator": {"namespace": namespace}}}
    docs = manifests(render(merged(ONE_REGION, patch)))
    ray_labels = next(pod_templates(one(docs, "RayService")))[1]["metadata"]["labels"]
    (policy,) = [
        p
        for p in by_kind(docs, "NetworkPolicy")
        if all(ray_labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())
    ]
    for port in (8265, 52365):  # the dashboard (and its Jobs API), the dashboard agent
        peers = [f for r in _rules_reaching(policy, port) for f in r.get("from", [{}])]
        assert peers, port
        for peer in peers:
            if "namespaceSelector" in peer:
                # Pinned by the name label the API server sets; never "any namespace".
                assert peer["namespaceSelector"] == {
                    "matchLabels": {"kubernetes.io/metadata.name": namespace or "kuberay-system"}
                }
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
            else:
                # Without a namespaceSelector a podSelector means this release's namespace only.
                assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"], peer


def test_kuberay_operator_namespace_must_be_named():
    values = merged(ONE_REGION, {"networkPolicy": {"kuberayOperator": {"namespace": ""}}})
    with pytest.raises(helm.HelmValuesError, match=r"at '/networkPolicy/kuberayOperator/namespace'"):
        render(values)


def test_default_image_is_the_one_make_image_builds():
    """`make image` tags levante:<version of pyproject.toml> (= appVersion); the chart names it by default."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = merged(STRICT, merged(TLS, TENANT))
    values.pop("image")
    docs = manifests(render(values))
    images = {c["image"] for _, t in pod_templates(one(docs, "RayService")) for c in t["spec"]["containers"]}
    images |= {c["image"] for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]}
    assert images == {f"levante:{chart['appVersion']}"}
