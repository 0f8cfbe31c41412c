"""YAML -> ``ClusterConfig``, with errors that name the file and the key.

A small generic mapper driven by ``dataclasses.fields`` and the type hints of
``cluster/config.py`` (and the engine configs it nests): it knows mappings
(nested dataclasses, ``dict[str, T]``), lists (``tuple[T, ...]``),
``X | None`` and the scalars bool/int/float/str. Types are checked strictly
(an int is accepted for a float; a bool is not an int) before a dataclass is
built; the values themselves are checked by the dataclasses'
``__post_init__``, whose ``ValueError("field: msg")`` is re-prefixed with the
dotted path.

``engine.parallel`` never comes from YAML: a rank's parallel settings are
known only when the replica places its ranks (rank number, rendezvous
address), so a loaded config keeps the default single-process
``ParallelConfig`` and the replica builds each rank's engine config with
``engine_config_for_rank`` (ep_size from ``replica.ep_size``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any

import yaml

from cluster.config import ClusterConfig, FrontDoorConfig, HealthCheckConfig
from engine.config import EngineConfig

_MISSING = dataclasses.MISSING
_SCALARS = {str, int, float, bool}
# Keys set at run time, never from YAML (the schema and the loader skip them).
_DERIVED = {
    "engine.parallel": "not set in YAML: set the ranks per replica with replica.ep_size "
    "(the replica derives each rank's engine.parallel from it)",
    "engine.scheduler.max_model_len": "not set in YAML: set engine.model.max_model_len "
    "(the engine derives the scheduler's from it and the cache size)",
}

_LIVENESS = (
    "a slow first token no longer marks a region as dead; liveness is regions.health.stream_idle_timeout_s "
    "(no chunk, heartbeats included) and the health checks"
)
# Keys that were removed, and what replaced them: named in the error instead of "unknown key".
_REPLACED: dict[tuple[type, str], str] = {
    (HealthCheckConfig, "slow_first_token_s"): f"removed: {_LIVENESS}",
    (HealthCheckConfig, "first_token_timeout_s"): f"removed: {_LIVENESS}; a limit on the first token "
    "is a tenant's setting: frontdoor.tenants[].first_token_timeout_s (it ends the request with "
    "DEADLINE_EXCEEDED, and ejects no region)",
}

# Keys whose form changed: a value of the old type gets this message instead of a bare type error.
_OLD_FORMS: dict[tuple[type, str], tuple[type, str]] = {
    (FrontDoorConfig, "admin"): (
        bool,
        (
            "a bare true/false is the old form: admin is now a mapping, served on its own port "
            "(127.0.0.1 by default) and only with a credential, e.g. "
            "{enabled: true, api_key_env: LEVANTE_ADMIN_KEY} (see configs/README.md)"
        ),
    ),
}


class ConfigError(ValueError):
    """A config that cannot be loaded; the message starts with ``source: dotted.key:``."""


# Keys naming files or folders the config reads; relative ones resolve against the config file's folder.
PATH_KEYS = (
    "engine.model.model",
    "engine.model.tokenizer",
    "frontdoor.tls.cert",
    "frontdoor.tls.key",
    "frontdoor.tls.client_ca",
    "regions.peers[].tls_ca",
    "regions.peers[].tls_cert",
    "regions.peers[].tls_key",
    "ray.temp_dir",
)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # tiny:..., mistral-common:...: names, not paths
# The three kinds of YAML file and the command each is for; ``file_kind`` tells them apart.
CLUSTER_CONFIG, TOPOLOGY, SCENARIO = "cluster config", "topology file", "drill scenario"
COMMANDS = {CLUSTER_CONFIG: "levante serve", TOPOLOGY: "levante up", SCENARIO: "levante drill"}


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and check one YAML file; relative paths in it (``PATH_KEYS``) resolve against its folder."""
    source = os.fspath(path)
    data = read_yaml(source)
    check_kind(data, source, CLUSTER_CONFIG)
    return config_from_dict(resolve_paths(data, os.path.dirname(os.path.abspath(source))), source)


def file_kind(data: Any) -> str | None:
    """Which kind of file ``data`` is, by the top-level keys only one kind has; None: cannot tell."""
    if not isinstance(data, dict):
        return None
    if any(k in data for k in ("topology", "faults", "slo", "load")):
        return SCENARIO
    regions = data.get("regions")
    if isinstance(regions, list) or any(k in data for k in ("base", "admin")):
        return TOPOLOGY  # a cluster config's `regions` is a mapping (peers, health)
    cluster_keys = {f.name for f in dataclasses.fields(ClusterConfig)}
    if isinstance(regions, dict) or any(k in cluster_keys - {"regions"} for k in data):
        return CLUSTER_CONFIG
    return None


def check_kind(data: Any, source: str, expected: str) -> None:
    """Refuse a file of another kind, saying which command it belongs to (not a list of unknown keys)."""
    kind = file_kind(data)
    if kind is not None and kind != expected:
        raise ConfigError(
            f"{source}: this is a {kind} for '{COMMANDS[kind]}', not a {expected} for '{COMMANDS[expected]}'"
        )


def resolve_paths(data: Any, base_dir: str) -> Any:
    """A copy of plain config data whose relative ``PATH_KEYS`` are joined to ``base_dir``.

    Absolute paths, ``~`` paths and ``scheme:`` names are kept; values of the wrong type are left
    for ``config_from_dict`` to name.
    """
    if not isinstance(data, dict):
        return data
    out = copy.deepcopy(data)
    for key in PATH_KEYS:
        _resolve_at(out, key.split("."), base_dir)
    return out


def _resolve_at(node: Any, parts: list[str], base_dir: str) -> None:
    head, rest = parts[0], parts[1:]
    many = head.endswith("[]")
    name = head.removesuffix("[]")
    if not isinstance(node, dict) or name not in node:
        return
    if many:
        for item in node[name] if isinstance(node[name], list) else ():
            _resolve_at(item, rest, base_dir)
    elif rest:
        _resolve_at(node[name], rest, base_dir)
    elif _is_relative_path(node[name]):
        node[name] = os.path.normpath(os.path.join(base_dir, node[name]))


def _is_relative_path(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(value)
        and not os.path.isabs(value)
        and not value.startswith("~")
        and not _URI.match(value)
    )


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """One YAML file as plain data (duplicate keys refused); errors name the file and the line."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    return data


def build_dataclass(cls: type, data: Any, source: str) -> Any:
    """Any config dataclass from plain data, checked like a cluster config (topologies, drill scenarios)."""
    return _Mapper(source).build(cls, data, "")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ClusterConfig:
    """Build a ``ClusterConfig`` from plain nested dicts (parsed YAML, or ``config_to_dict``'s output)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {_describe(data)}")
    for key, why in _DERIVED.items():
        if _lookup(data, key) is not _MISSING:
            raise ConfigError(f"{source}: {key}: {why}")
    return _Mapper(source).build(ClusterConfig, data, "")


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def engine_config_for_rank(cfg: ClusterConfig, ep_rank: int, **parallel: Any) -> EngineConfig:
    """The engine config of rank ``ep_rank`` of a replica: ``engine.parallel.ep_size`` from ``replica.ep_size``.

    ``parallel`` sets further ``ParallelConfig`` fields known only at placement
    time (e.g. the rendezvous address); a bad value raises ValueError naming the field.
    """
    fields = {"ep_size": cfg.replica.ep_size, "ep_rank": ep_rank, **parallel}
    return dataclasses.replace(cfg.engine, parallel=dataclasses.replace(cfg.engine.parallel, **fields))


def config_to_dict(cfg: ClusterConfig) -> dict[str, Any]:
    """Every key of ``cfg`` as plain dicts/lists/scalars (YAML- and JSON-able), minus the derived ``engine.parallel``.

    ``config_from_dict(config_to_dict(c)) == c`` for every config whose
    ``engine.parallel`` is the default (all loaded configs).
    """
    out = _to_plain(cfg, "")
    for key in _DERIVED:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        del node[last]
    return out


# -- loading -----------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Mapper:
    def __init__(self, source: str):
        self.source = source

    def error(self, path: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}")

    def build(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            hint = " (write {} for the defaults, or remove the key)" if data is None else ""
            raise self.error(path or "<top level>", f"expected a mapping, got {_describe(data)}{hint}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        for key in data:
            if key not in fields:
                why = _REPLACED.get((cls, str(key))) or _unknown_key(str(key), fields)
                raise self.error(_join(path, str(key)), why)
            old = _OLD_FORMS.get((cls, str(key)))
            if old is not None and isinstance(data[key], old[0]):
                raise self.error(_join(path, str(key)), old[1])
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = self.convert(hints[name], data[name], _join(path, name))
            elif f.default is _MISSING and f.default_factory is _MISSING:
                raise self.error(_join(path, name), "required key is missing")
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except ValueError as e:
            # "field: msg" from __post_init__ -> "path.field: msg".
            name, sep, msg = str(e).partition(": ")
            if sep and name.split(".")[0] in fields:  # a dotted name: a check across sections (a.b vs c.d)
                raise self.error(_join(path, name), msg) from None
            raise self.error(path or "<top level>", str(e)) from None

    def convert(self, hint: Any, value: Any, path: str) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in args if a is not type(None)]
            if value is None and len(inner) < len(args):
                return None
            if len(inner) > 1 and set(inner) <= _SCALARS:  # e.g. str | int | float | bool: the value's own type
                if type(value) not in inner:
                    names = " | ".join(a.__name__ for a in inner)
                    raise self.error(path, f"expected {names}, got {_describe(value)}")
                return value
            if len(inner) != 1:
                raise TypeError(f"{path}: only 'X | None' and scalar unions are supported, not {hint}")
            return self.convert(inner[0], value, path)
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, path)
        if origin is tuple:
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"{path}: only tuple[T, ...] is supported, not {hint}")
            if not isinstance(value, (list, tuple)):
                raise self.error(path, f"expected a list, got {_describe(value)}")
            return tuple(self.convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if origin is dict:
            if not isinstance(value, dict):
                raise self.error(path, f"expected a mapping, got {_describe(value)}")
            return {
                self.convert(args[0], k, f"{path} key {k!r}"): self.convert(args[1], v, _join(path, str(k)))
                for k, v in value.items()
            }
        return self.scalar(hint, value, path)

    def scalar(self, hint: Any, value: Any, path: str) -> Any:
        if hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif hint is str:
            ok = isinstance(value, str)
        else:
            raise TypeError(f"{path}: unsupported type {hint}")
        if not ok:
            raise self.error(path, f"expected {hint.__name__}, got {_describe(value)}")
        return value


def _unknown_key(key: str, fields: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (known keys: {', '.join(fields)})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    kind = {dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:60] + '...' if len(text) > 60 else text}"


# -- dumping -----------------------------------------------------------------


def _to_plain(value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_plain(getattr(value, f.name), _join(path, f.name)) for f in dataclasses.fields(value) if f.init
        }
    if isinstance(value, (tuple, list)):
        return [_to_plain(v, path) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v, path) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path}: cannot represent {type(value).__name__} in YAML")
