"""Topology files -> one checked cluster config per region, peers wired to each other."""

from __future__ import annotations

import os

import pytest
import yaml

from cluster.config_loader import ConfigError, config_from_dict
from cluster.ops.up.processes import new_keys
from cluster.ops.up.topology import ADMIN_KEY_ENV, PEER_KEY_ENV, PEER_TENANT, region_configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


def write(tmp_path, data, name="topo.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shipped_two_regions_are_peers_of_each_other():
    configs = region_configs(os.path.join(REPO, "configs", "two-regions.yaml"))
    assert list(configs) == ["eu-west", "us-east"]
    eu = config_from_dict(configs["eu-west"])
    assert eu.region == "eu-west" and eu.frontdoor.port == 50061 and eu.frontdoor.admin.enabled
    assert [(p.name, p.target) for p in eu.regions.peers] == [("us-east", "127.0.0.1:50062")]
    assert config_from_dict(configs["us-east"]).regions.peers[0].target == "127.0.0.1:50061"


def test_regions_get_admin_on_loopback_with_the_runs_key_and_peer_keys_for_each_other(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"frontdoor": {"tenants": [{"name": "acme", "api_key_env": "ACME_KEY"}]}})
    )
    configs = region_configs(write(tmp_path, {"base": "base.yaml", "regions": [{"name": "a"}, {"name": "b"}]}))
    a = config_from_dict(configs["a"])
    assert a.frontdoor.admin.enabled and a.frontdoor.admin.api_key_env == ADMIN_KEY_ENV
    assert (a.frontdoor.admin.host, a.frontdoor.admin.port) == ("127.0.0.1", 0)
    assert [(t.name, t.role) for t in a.frontdoor.tenants] == [("acme", "tenant"), (PEER_TENANT, "peer")]
    assert a.frontdoor.tenants[1].api_key_env == PEER_KEY_ENV
    assert [(p.name, p.api_key_env) for p in a.regions.peers] == [("b", PEER_KEY_ENV)]
    one, two = new_keys(), new_keys()
    assert set(one) == {ADMIN_KEY_ENV, PEER_KEY_ENV} and len(one[ADMIN_KEY_ENV]) >= 32
    assert one[ADMIN_KEY_ENV] != one[PEER_KEY_ENV] and one != two  # fresh, random, per run


def test_port_zero_gets_distinct_free_ports_and_overrides_merge(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model_name": "m", "ray": {"num_cpus": 4}}))
    path = write(
        tmp_path,
        {
            "base": "base.yaml",
            "overrides": {"ray": {"num_cpus": 2}},
            "regions": [
                {"name": "a"},
                {"name": "b", "overrides": {"model_name": "other"}},
                {"name": "c", "port": 50999},
            ],
        },
    )
    configs = region_configs(path, {"regions": {"health": {"interval_s": 0.25}}})
    ports = [c["frontdoor"]["port"] for c in configs.values()]
    assert len(set(ports)) == 3 and all(ports) and ports[2] == 50999
    a, b = config_from_dict(configs["a"]), config_from_dict(configs["b"])
    assert a.ray.num_cpus == 2 and a.model_name == "m" and b.model_name == "other"
    assert a.regions.health.interval_s == 0.25 and {p.name for p in a.regions.peers} == {"b", "c"}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"regions": [{"name": "a"}, {"name": "a"}]}, r"regions: region names must be unique"),
        ({"regions": [{"name": "a b"}]}, r"regions\[0\]\.name: must be letters"),
        ({"regions": [{"name": "a", "prot": 1}]}, r"regions\[0\]\.prot: unknown key \(did you mean port\?\)"),
        ({"regions": []}, r"regions: list at least one region"),
        (
            {"regions": [{"name": "a"}], "overrides": {"replica": {"ep_sise": 2}}},
            r"region a, base .*replica\.ep_sise: unknown key",
        ),
        ({"regions": [{"name": "a"}], "base": "missing.yaml"}, r"missing\.yaml: no such config file"),
    ],
)
def test_bad_topologies_name_the_key(tmp_path, data, match):
    (tmp_path / "local.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=match):
        region_configs(write(tmp_path, data))


def test_each_regions_http_api_takes_a_free_port_unless_its_config_sets_one(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model_name": "m"}))
    regions = [{"name": "a"}, {"name": "b", "overrides": {"frontdoor": {"http": {"port": 8123}}}}]
    configs = region_configs(write(tmp_path, {"base": "base.yaml", "regions": regions}))
    # the plain data `levante up` hands each region: 0 written out, not the shipped 8000 they would all want
    assert configs["a"]["frontdoor"]["http"] == {"port": 0}
    assert configs["b"]["frontdoor"]["http"] == {"port": 8123}
    assert config_from_dict(configs["b"]).frontdoor.http.port == 8123
