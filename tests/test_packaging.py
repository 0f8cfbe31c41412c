"""Levante installs top-level packages with common names (engine, kernels, cluster); no other installed
distribution may ship one of them, or pip lets it overwrite ours in site-packages (Hugging Face's
`kernels`, which transformers 5.25 requires, ships a top-level `kernels`)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_other_installed_distribution_ships_levantes_top_level_packages():
    with open(ROOT / "pyproject.toml", "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    names = [p.rstrip("*") for p in patterns]
    owners = importlib.metadata.packages_distributions()
    others = {name: sorted(set(owners.get(name, [])) - {"levante"}) for name in names}
    assert not any(others.values()), others
