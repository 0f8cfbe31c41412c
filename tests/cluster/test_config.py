"""Config loading: shipped files load, round trips hold, every error names file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig, FrontDoorConfig, PeerConfig, RegionsConfig, ReplicaConfig, TenantConfig
from cluster.config_loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    engine_config_for_rank,
    load_config,
)
from engine.config import ParallelConfig
from tests.cluster.schema import describe_schema

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# Besides cluster configs, configs/ holds topologies for `levante up` (tests/cluster/ops/up) and drill
# scenarios with their topologies under drills/ (tests/cluster/ops/drill).
TOPOLOGIES = {"two-regions.yaml"}
SHIPPED = sorted(
    p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "drills" and p.name not in TOPOLOGIES
)


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_configs_are_shipped():
    names = {p.relative_to(CONFIGS).as_posix() for p in SHIPPED}
    assert {"local.yaml", "moe-ep2.yaml", "mistral-small-4.yaml", "examples/tls-tenants.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_config_loads_and_round_trips(path: Path):
    cfg = load_config(path)
    assert cfg.engine.parallel == ParallelConfig()  # set per rank by the replica, never by YAML
    as_yaml = yaml.safe_dump(config_to_dict(cfg))  # YAML-able: plain types only
    assert config_from_dict(yaml.safe_load(as_yaml)) == cfg


def test_local_config_is_the_documented_default():
    cfg = load_config(CONFIGS / "local.yaml")
    assert (cfg.region, cfg.engine.model.model, cfg.replica.ep_size, cfg.replica.num_replicas) == ("local", None, 1, 1)
    assert (cfg.frontdoor.host, cfg.frontdoor.port, cfg.frontdoor.tenants) == ("127.0.0.1", 50051, ())
    assert cfg.ray.num_cpus == 4


def test_moe_config():
    cfg = load_config(CONFIGS / "moe-ep2.yaml")
    assert cfg.replica.ep_size == 2
    assert cfg.engine.model.model == "tiny:mistral4?seed=0&vocab_size=32768"
    assert cfg.engine.model.tokenizer == "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
    assert cfg.engine.model.num_threads == 1


def test_mistral_small_4_config_is_the_vllm_two_gpu_recipe():
    cfg = load_config(CONFIGS / "mistral-small-4.yaml")
    assert cfg.engine.backend == "vllm" and cfg.replica.accelerator == "gpu" and cfg.replica.ep_size == 1
    v = cfg.engine.vllm
    assert (v.tensor_parallel_size, v.world_size, v.attention_backend) == (2, 2, "FLASH_ATTN_MLA")
    assert v.gpu_memory_utilization == 0.9
    assert cfg.engine.model.model == "/models/Mistral-Small-4-119B-2603"
    assert (cfg.engine.model.max_model_len, cfg.engine.model.dtype) == (131072, "bfloat16")
    assert cfg.engine.reasoning.think_start is None  # markers picked from the tokenizer


def test_engine_config_for_rank_takes_ep_size_from_replica():
    cfg = config_from_dict({"replica": {"ep_size": 2}, "engine": {"cache": {"block_size": 32}}})
    rank1 = engine_config_for_rank(cfg, 1, init_method="tcp://127.0.0.1:29500")
    assert (rank1.parallel.ep_size, rank1.parallel.ep_rank) == (2, 1)
    assert rank1.parallel.init_method == "tcp://127.0.0.1:29500"
    assert rank1.cache == cfg.engine.cache and rank1.model == cfg.engine.model
    assert engine_config_for_rank(config_from_dict({}), 0).parallel.ep_size == 1
    with pytest.raises(ValueError, match="^ep_rank: "):
        engine_config_for_rank(cfg, 2, init_method="tcp://127.0.0.1:29500")


def test_tls_example_has_mtls_and_two_tenants():
    cfg = load_config(CONFIGS / "examples" / "tls-tenants.yaml")
    assert cfg.frontdoor.tls.enabled and cfg.frontdoor.tls.client_ca
    assert [t.name for t in cfg.frontdoor.tenants] == ["acme", "internal"]
    assert all(t.api_key_env and t.api_key is None for t in cfg.frontdoor.tenants)
    assert cfg.frontdoor.tenants[0].max_effort == "medium"


def test_empty_mapping_is_all_defaults():
    assert config_from_dict({}) == ClusterConfig()


def test_round_trip_of_a_config_built_in_python():
    cfg = ClusterConfig(
        region="eu-west",
        replica=ReplicaConfig(ep_size=1, num_replicas=3, cpus_per_rank=0.5),
        frontdoor=FrontDoorConfig(
            port=0,
            tenants=(
                TenantConfig(name="a", api_key="k1", requests_per_second=2.5, burst=3),
                TenantConfig(name="b", api_key_env="B_KEY", max_effort="low"),
            ),
        ),
    )
    plain = config_to_dict(cfg)
    assert "parallel" not in plain["engine"]
    assert plain["frontdoor"]["tenants"][1] == {
        "name": "b",
        "api_key": None,
        "api_key_env": "B_KEY",
        "requests_per_second": 0.0,
        "burst": 0,
        "max_concurrency": 0,
        "max_effort": "low",
        "first_token_timeout_s": 0.0,
        "prefix_cache_group": None,
        "role": "tenant",
    }
    assert config_from_dict(plain) == cfg


def test_types_are_converted_from_yaml_shapes():
    cfg = config_from_dict(
        {
            "replica": {"cpus_per_rank": 2},  # int accepted for float
            "engine": {"reasoning": {"think_start_ids": [5], "think_end_ids": [6, 7]}},
            "router": {"auto": {"keywords": ["why"], "min_deadline_s": {"high": 30}}},
        }
    )
    assert cfg.replica.cpus_per_rank == 2.0 and isinstance(cfg.replica.cpus_per_rank, float)
    assert cfg.engine.reasoning.think_end_ids == (6, 7)  # list -> tuple
    assert cfg.router.auto.keywords == ("why",)
    assert cfg.router.auto.min_deadline_s == {"high": 30.0}


# -- errors: each names the file and the dotted key ----------------------------

ERRORS = [
    ("frontdoor:\n  port: 70000\n", "frontdoor.port: must be in [0, 65535], got 70000"),
    ("replica:\n  ep_sise: 2\n", "replica.ep_sise: unknown key (did you mean ep_size?)"),
    ("zzz: 1\n", "zzz: unknown key (known keys: region, "),
    ("engine:\n  cache:\n    block_size: x\n", "engine.cache.block_size: expected int, got str 'x'"),
    ("replica:\n  ep_size: true\n", "replica.ep_size: expected int, got bool True"),
    ("replica:\n  ep_size: 1.5\n", "replica.ep_size: expected int, got float 1.5"),
    (
        "engine:\n  cache:\n    enable_prefix_caching: 1\n",
        "engine.cache.enable_prefix_caching: expected bool, got int 1",
    ),
    ("region: null\n", "region: expected str, got null"),
    ("region: ''\n", "region: must not be empty"),
    ("replica:\n  ep_size: 0\n", "replica.ep_size: must be >= 1"),
    ("engine:\n  model:\n    dtype: fp16\n", "engine.model.dtype: must be one of ('float32', 'bfloat16'), got 'fp16'"),
    ("frontdoor:\n", "frontdoor: expected a mapping, got null"),
    ("router:\n  auto:\n    keywords: why\n", "router.auto.keywords: expected a list, got str 'why'"),
    (
        "router:\n  auto:\n    min_deadline_s:\n      low: soon\n",
        "router.auto.min_deadline_s.low: expected float, got str 'soon'",
    ),
    ("router:\n  auto:\n    min_deadline_s:\n      extreme: 1\n", "router.auto.min_deadline_s: keys must be among"),
    (
        "engine:\n  parallel:\n    ep_size: 2\n",
        "engine.parallel: not set in YAML: set the ranks per replica with replica.ep_size",
    ),
    (
        "engine:\n  scheduler:\n    max_model_len: 99\n",
        "engine.scheduler.max_model_len: not set in YAML: set engine.model.max_model_len",
    ),
    ("frontdoor:\n  tls:\n    cert: a.pem\n", "frontdoor.tls.cert: set both cert and key, or neither"),
    (
        "frontdoor:\n  tenants:\n    - {name: a, api_key: k}\n    - {name: b, api_key: k, max_effort: max}\n",
        "frontdoor.tenants[1].max_effort: must be one of ('none', 'low', 'medium', 'high')",
    ),
    ("frontdoor:\n  tenants:\n    - {api_key: k}\n", "frontdoor.tenants[0].name: required key is missing"),
    (
        "frontdoor:\n  tenants:\n    - {name: a, api_key: k, burts: 3}\n",
        "frontdoor.tenants[0].burts: unknown key (did you mean burst?)",
    ),
    (
        "frontdoor:\n  tenants:\n    - {name: a, api_key: k}\n    - {name: a, api_key: j}\n",
        "frontdoor.tenants: tenant names must be unique",
    ),
    (
        "frontdoor:\n  tenants:\n    - {name: a, api_key: k}\n    - {name: b, api_key: k}\n",
        "frontdoor.tenants: tenant api_keys must be unique",
    ),
    ("router:\n  auto:\n    min_deadline_s: {low: -1}\n", "router.auto.min_deadline_s: values must be >= 0"),
    ("router:\n  auto:\n    keywords: [why, ' ']\n", "router.auto.keywords: must not contain blank keywords"),
    ("frontdoor:\n  tenants:\n    - just-a-name\n", "frontdoor.tenants[0]: expected a mapping, got str 'just-a-name'"),
    ("telemetry:\n  tracing:\n    sample_ratio: 1.5\n", "telemetry.tracing.sample_ratio: must be in [0, 1], got 1.5"),
    (
        "telemetry:\n  tracing:\n    otlp_endpoint: collector\n",
        "telemetry.tracing.otlp_endpoint: must be host:port of an OTLP gRPC receiver, got 'collector'",
    ),
    ("telemetry:\n  tracing:\n    enable: true\n", "telemetry.tracing.enable: unknown key (did you mean enabled?)"),
    ("telemetry:\n  metrics:\n    port: 65536\n", "telemetry.metrics.port: must be in [0, 65535], got 65536"),
    (
        "telemetry:\n  metrics: {enabled: true, port: 50051}\n",
        "telemetry.metrics.port: must differ from frontdoor.port (50051)",
    ),
    # the former first-token liveness keys: named, with what replaced them
    (
        "regions:\n  health: {slow_first_token_s: 2.0}\n",
        (
            "regions.health.slow_first_token_s: removed: a slow first token no longer marks a region as dead; "
            "liveness is regions.health.stream_idle_timeout_s"
        ),
    ),
    (
        "regions:\n  health: {first_token_timeout_s: 10}\n",
        "regions.health.first_token_timeout_s: removed: a slow first token no longer marks a region as dead",
    ),
    (
        "frontdoor:\n  tenants: [{name: a, api_key: k, first_token_timeout_s: -1}]\n",
        "frontdoor.tenants[0].first_token_timeout_s: must be >= 0 (0: no limit)",
    ),
    (
        "regions:\n  health: {stream_idle_timeout_s: 0.4}\n",
        "replica.heartbeat_s: 0.5 must be below regions.health.stream_idle_timeout_s (0.4)",
    ),
]


def test_the_removed_first_token_key_points_at_the_tenant_setting(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"frontdoor\.tenants\[\]\.first_token_timeout_s \(it ends the request"):
        load_config(write(tmp_path, "regions:\n  health: {first_token_timeout_s: 10}\n"))


@pytest.mark.parametrize("text,expected", ERRORS, ids=[e[1].split(":")[0] for e in ERRORS])
def test_error_names_file_and_key(tmp_path: Path, text: str, expected: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {expected}")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_yaml_syntax_error_names_line(tmp_path: Path):
    path = write(tmp_path, "region: local\nfrontdoor:\n  port: [1\n  host: x\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line \d+, column \d+: invalid YAML"):
        load_config(path)
    path = write(tmp_path, "region: local\nreplica: x: y\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line 2, column \d+: invalid YAML"):
        load_config(path)


def test_duplicate_key_is_an_error(tmp_path: Path):
    path = write(tmp_path, "replica:\n  ep_size: 1\n  ep_size: 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line 3, column 3: .*duplicate key 'ep_size'"):
        load_config(path)


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: no such config file$"):
        load_config(path)


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("", "null")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: the top level must be a mapping.*got {kind}"):
        load_config(path)


def test_dict_source_defaults_to_placeholder():
    with pytest.raises(ConfigError, match=r"^<dict>: replica.ep_size: must be >= 1"):
        config_from_dict({"replica": {"ep_size": 0}})


# -- the schema and its README --------------------------------------------------


def _leaf_keys(value: object, path: str = "") -> set[str]:
    """Dotted keys of config_to_dict's output, walked independently of describe_schema."""
    if isinstance(value, dict) and (path == "" or not path.endswith("min_deadline_s")):
        keys = {f"{path}.{k}" if path else k for k in value}
        for k, v in value.items():
            keys |= _leaf_keys(v, f"{path}.{k}" if path else k)
        return keys
    return set()


def test_schema_covers_every_key():
    cfg = ClusterConfig(
        frontdoor=FrontDoorConfig(tenants=(TenantConfig(name="a", api_key="k"),)),
        regions=RegionsConfig(peers=(PeerConfig(name="b", target="b:1"),)),
    )
    plain = config_to_dict(cfg)
    plain["frontdoor"]["tenants"] = {"[]": plain["frontdoor"]["tenants"][0]}  # items as "tenants[]"
    plain["regions"]["peers"] = {"[]": plain["regions"]["peers"][0]}
    expected = {k.replace(".[]", "[]") for k in _leaf_keys(plain)} - {"frontdoor.tenants[]", "regions.peers[]"}
    assert {e.key for e in describe_schema()} == expected


def test_schema_defaults_are_the_dataclass_defaults():
    entries = {e.key: e for e in describe_schema()}
    assert entries["frontdoor.port"].default == "50051"
    assert entries["engine.model.model"].type == "str | null"
    assert entries["frontdoor.tenants[].name"].default == "required"
    assert entries["router.auto.min_deadline_s"].type == "map str -> float"


def test_readme_documents_every_key_with_type_and_default():
    readme = (CONFIGS / "README.md").read_text()
    lines = readme.splitlines()
    for entry in describe_schema():
        if entry.type == "section":
            assert f"### `{entry.key}`" in lines, f"configs/README.md lacks a heading for section {entry.key}"
            continue
        head = f"- `{entry.key}` "
        found = [ln for ln in lines if ln.startswith(head)]
        assert len(found) == 1, f"configs/README.md should have one line for {entry.key}"
        default = "required" if entry.default == "required" else f"default `{entry.default}`"
        assert found[0].startswith(f"{head}({entry.type}, {default}): "), (
            f"configs/README.md line for {entry.key} should read ({entry.type}, {default})"
        )


def test_readme_documents_no_stale_keys():
    documented = set(re.findall(r"^- `([a-z_.\[\]]+)` \(", (CONFIGS / "README.md").read_text(), re.MULTILINE))
    headings = set(re.findall(r"^### `([a-z_.]+)`", (CONFIGS / "README.md").read_text(), re.MULTILINE))
    assert documented | headings == {e.key for e in describe_schema()}


# -- regions --------------------------------------------------------------------------------------


def test_peers_load_and_are_checked():
    cfg = config_from_dict(
        {
            "region": "eu",
            "regions": {"peers": [{"name": "us", "target": "127.0.0.1:50062"}], "health": {"interval_s": 0.5}},
        }
    )
    assert cfg.regions.peers[0].target == "127.0.0.1:50062" and cfg.regions.health.interval_s == 0.5
    with pytest.raises(ConfigError, match=r"regions\.peers\[0\]\.target: must be host:port"):
        config_from_dict({"regions": {"peers": [{"name": "us", "target": "nowhere"}]}})
    with pytest.raises(ConfigError, match=r"regions\.peers: must not list this region \('eu'\)"):
        config_from_dict({"region": "eu", "regions": {"peers": [{"name": "eu", "target": "h:1"}]}})
    with pytest.raises(ConfigError, match=r"regions\.health\.max_ejection_s: must be >= base_ejection_s"):
        config_from_dict({"regions": {"health": {"base_ejection_s": 10, "max_ejection_s": 5}}})


def test_a_peer_api_key_is_refused_without_tls():
    """The key a region presents to a peer would cross the network in the clear without tls_ca;
    only a loopback peer (regions on one machine, `levante up`) may take it in plaintext."""
    peer = {"name": "us", "target": "us.example.net:50051", "api_key_env": "LEVANTE_KEY_US"}
    for target in ("us.example.net:50051", "10.0.0.7:50051", "[2001:db8::1]:50051", "localhost.example.net:1"):
        with pytest.raises(ConfigError, match=r"regions\.peers\[0\]\.api_key_env: an API key is sent only over TLS"):
            config_from_dict({"regions": {"peers": [{**peer, "target": target}]}})
    cfg = config_from_dict({"regions": {"peers": [{**peer, "tls_ca": "/etc/levante/peer-tls/ca.crt"}]}})
    assert cfg.regions.peers[0].api_key_env == "LEVANTE_KEY_US"
    for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1"):
        assert config_from_dict({"regions": {"peers": [{**peer, "target": target}]}}).regions.peers[0].target == target
