"""Config checks that need this machine (files, environment variables, ports) run before Ray starts.

Every message is one line naming the config file and the full dotted key; the CLI exits 2.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import cli
from cluster.config_loader import ConfigError, config_from_dict, config_to_dict, load_config
from cluster.ops.up.topology import region_configs
from cluster.preflight import preflight, problems

ROOT = Path(__file__).resolve().parents[2]
UNSET = "LEVANTE_TEST_PREFLIGHT_UNSET"


def write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def listener() -> Iterator[int]:
    """A port some other process holds: bound to port 0 and listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_unset_api_key_env_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    from cluster.region import RegionServer

    started: list[str] = []

    def spy(name: str):
        def record(*args, **kwargs):
            started.append(name)
            raise RuntimeError(f"{name} must not be reached")

        return record

    monkeypatch.setattr(RegionServer, "start", spy("RegionServer.start"))
    monkeypatch.setattr(ray, "init", spy("ray.init"))
    monkeypatch.delenv(UNSET, raising=False)
    path = write(
        tmp_path / "tenants.yaml",
        {
            "engine": {"model": {"model": str(tmp_path / "no-such-model")}},
            "frontdoor": {"port": 0, "tenants": [{"name": "acme", "api_key_env": UNSET}]},
        },
    )
    code = cli.main(["serve", "--config", str(path)])
    err = capsys.readouterr().err
    assert started == []
    assert code == 2
    assert err == (
        f"levante: error: {path}: frontdoor.tenants[0].api_key_env: "
        f"environment variable '{UNSET}' is not set or empty\n"
    )


def test_unreadable_cert_names_the_key_and_the_file(tmp_path):
    path = write(
        tmp_path / "tls.yaml",
        {"frontdoor": {"port": 0, "tls": {"cert": "/nonexistent/server.pem", "key": "/nonexistent/server-key.pem"}}},
    )
    with pytest.raises(ConfigError) as e:
        preflight(load_config(path), str(path))
    assert str(e.value) == (
        f"{path}: frontdoor.tls.cert: cannot read '/nonexistent/server.pem': "
        f"No such file or directory (and 1 more: frontdoor.tls.key)"
    )


def test_relative_cert_resolves_against_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    (folder / "certs").mkdir(parents=True)
    for name in ("server.pem", "server-key.pem"):
        (folder / "certs" / name).write_text("PEM")
    write(
        folder / "cluster.yaml",
        {"frontdoor": {"port": 0, "tls": {"cert": "certs/server.pem", "key": "./certs/server-key.pem"}}},
    )
    monkeypatch.chdir(tmp_path)  # not the config's folder: certs/server.pem does not exist from here
    cfg = load_config("conf/cluster.yaml")
    assert cfg.frontdoor.tls.cert == str(folder / "certs" / "server.pem")
    assert cfg.frontdoor.tls.key == str(folder / "certs" / "server-key.pem")
    preflight(cfg, "conf/cluster.yaml")  # readable: no error
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_only_relative_paths_are_resolved(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        {
            "engine": {"model": {"model": "tiny:mistral4?seed=0", "tokenizer": "mistral-common:tekken_240911.json"}},
            "regions": {"peers": [{"name": "us", "target": "h:1", "tls_ca": "ca.pem"}]},
            "ray": {"temp_dir": "/tmp/abs"},
        },
    )
    cfg = load_config(path)
    assert (cfg.engine.model.model, cfg.engine.model.tokenizer) == (
        "tiny:mistral4?seed=0",
        "mistral-common:tekken_240911.json",
    )
    assert cfg.regions.peers[0].tls_ca == str(tmp_path / "ca.pem") and cfg.ray.temp_dir == "/tmp/abs"
    model = load_config(write(tmp_path / "m.yaml", {"engine": {"model": {"model": "ckpt/m.gguf"}}}))
    assert model.engine.model.model == str(tmp_path / "ckpt" / "m.gguf")
    assert config_from_dict({"frontdoor": {"tls": {"cert": "a.pem", "key": "b.pem"}}}).frontdoor.tls.cert == "a.pem"


def test_metrics_port_clash_names_the_file_and_the_key(tmp_path, listener):
    path = write(
        tmp_path / "metrics.yaml",
        {"frontdoor": {"port": 0}, "telemetry": {"metrics": {"enabled": True, "port": listener}}},
    )
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(path))}: telemetry\.metrics\.port: "
        rf"cannot bind 127\.0\.0\.1:{listener}: Address already in use$",
    ):
        preflight(load_config(path), str(path))


def test_frontdoor_port_clash_and_port_zero(listener):
    assert problems(config_from_dict({"frontdoor": {"port": listener}}), {}) == [
        ("frontdoor.port", f"cannot bind 127.0.0.1:{listener}: Address already in use")
    ]
    assert (
        problems(
            config_from_dict({"frontdoor": {"port": 0}, "telemetry": {"metrics": {"enabled": True, "port": 0}}}), {}
        )
        == []
    )


def test_peers_files_and_keys_and_tenant_keys(tmp_path):
    cfg = config_from_dict(
        {
            "frontdoor": {
                "port": 0,
                "tenants": [{"name": "a", "api_key_env": "KA"}, {"name": "b", "api_key_env": "KB"}],
            },
            "regions": {
                "peers": [{"name": "us", "target": "h:1", "tls_ca": str(tmp_path / "ca.pem"), "api_key_env": "KP"}]
            },
        }
    )
    assert problems(cfg, {"KA": "same", "KB": "same"}) == [
        ("frontdoor.tenants[1].api_key_env", "same key as tenant 'a'"),
        ("regions.peers[0].tls_ca", f"cannot read '{tmp_path / 'ca.pem'}': No such file or directory"),
        ("regions.peers[0].api_key_env", "environment variable 'KP' is not set or empty"),
    ]
    (tmp_path / "ca.pem").write_text("PEM")
    assert problems(cfg, {"KA": "1", "KB": "2", "KP": "3"}) == []


def test_serve_refuses_a_topology_and_up_refuses_a_cluster_config(tmp_path):
    topology = ROOT / "configs" / "two-regions.yaml"
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(topology))}: this is a topology file for 'levante up', "
        r"not a cluster config for 'levante serve'$",
    ):
        load_config(topology)
    config = ROOT / "configs" / "local.yaml"
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(config))}: this is a cluster config for 'levante serve', "
        r"not a topology file for 'levante up'$",
    ):
        region_configs(str(config))
    base = write(tmp_path / "topo.yaml", {"base": "two-regions.yaml", "regions": [{"name": "a"}]})
    (tmp_path / "two-regions.yaml").write_text(topology.read_text())
    with pytest.raises(
        ConfigError,
        match=r"two-regions\.yaml: this is a topology file for 'levante up', "
        r"not a cluster config",
    ):
        region_configs(str(base))


def test_up_checks_every_region_before_starting_any(tmp_path, monkeypatch, capsys):
    from cluster.ops.up.processes import LocalRegions

    spawned: list[str] = []
    monkeypatch.setattr(LocalRegions, "_spawn", lambda self, name, cfg: spawned.append(name))
    monkeypatch.delenv(UNSET, raising=False)
    write(tmp_path / "base.yaml", {"frontdoor": {"tenants": [{"name": "acme", "api_key_env": UNSET}]}})
    topo = write(tmp_path / "topo.yaml", {"base": "base.yaml", "regions": [{"name": "a"}, {"name": "b"}]})
    code = cli.main(["up", "--config", str(topo), "--state-dir", str(tmp_path / "state")])
    assert (code, spawned) == (2, [])
    assert capsys.readouterr().err == (
        f"levante: error: {topo} (region a): frontdoor.tenants[0].api_key_env: "
        f"environment variable '{UNSET}' is not set or empty\n"
    )


def test_check_is_documented_where_make_serve_is():
    recipe = re.search(r"^serve:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    command = recipe.replace("$(VENV)/bin/levante", "levante")
    assert "--check" in command
    assert command in (ROOT / "README.md").read_text()
    assert command in (ROOT / "docs" / "serving.md").read_text()


def test_serve_help_describes_check(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--check PROMPT" in text and "make serve" in text and "--exit-after-check" in text
