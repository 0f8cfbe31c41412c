"""The cluster config's YAML schema, key by key, for the checks that configs/README.md and the Helm
chart's values schema describe exactly what the loader reads (tests/cluster/test_config.py,
tests/helm/test_values.py)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from cluster.config import ClusterConfig
from cluster.config_loader import _DERIVED, _join, _to_plain

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class SchemaEntry:
    """One key of the YAML schema, for docs and the README check."""

    key: str  # dotted; list items as ``section.list[].key``
    type: str  # e.g. "int", "str | null", "list of str", "map str -> float"
    default: str  # JSON (which is also YAML); "required" when there is none


def describe_schema() -> list[SchemaEntry]:
    """Every settable key in file order, depth first (sections before their keys)."""
    entries: list[SchemaEntry] = []
    _describe_class(ClusterConfig, "", entries)
    return entries


def _describe_class(cls: type, path: str, out: list[SchemaEntry]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        if not f.init or key in _DERIVED:
            continue
        hint = hints[f.name]
        if f.default is not _MISSING:
            default = json.dumps(_to_plain(f.default, key))
        elif f.default_factory is not _MISSING:
            default = json.dumps(_to_plain(f.default_factory(), key))
        else:
            default = "required"
        if dataclasses.is_dataclass(hint):
            out.append(SchemaEntry(key, "section", "{}"))
            _describe_class(hint, key, out)
            continue
        out.append(SchemaEntry(key, _type_name(hint), default))
        item = _list_item_class(hint)
        if item is not None:
            _describe_class(item, f"{key}[]", out)


def _list_item_class(hint: Any) -> type | None:
    if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return typing.get_args(hint)[0]
    return None


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map {_type_name(args[0])} -> {_type_name(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return hint.__name__
