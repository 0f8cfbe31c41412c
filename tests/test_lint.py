"""The lint tools as tests, so `make test` (CI) runs them: ruff's checks and formatting, the import-linter
contracts (the layer boundaries), vulture (dead code), and a cap on function length. The tools are the
ones installed beside this interpreter (the `test` extras), configured in pyproject.toml."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # not resolved: a venv's python is a link out of the venv
LINT = {
    "ruff-check": ["ruff", "check", "."],
    "ruff-format": ["ruff", "format", "--check", "."],
    "lint-imports": ["lint-imports"],
    "vulture": ["vulture"],
}
PACKAGES = ("engine", "cluster", "kernels")
MAX_FUNCTION_LINES = 60  # a function must be shorter than this


@pytest.mark.parametrize("cmd", list(LINT.values()), ids=list(LINT))
def test_lint(cmd: list[str]):
    tool = BIN / cmd[0]
    assert tool.exists(), f"{tool} is missing: install the test extras (pip install -e '.[test]')"
    done = subprocess.run([str(tool), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_make_lint_runs_the_same_commands():
    """`make lint` is these tests' commands, run with the venv's tools."""
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "the Makefile has no lint target"
    assert sorted(recipe.group(1).split("\n")[:-1]) == sorted(f"\t$(VENV)/bin/{' '.join(c)}" for c in LINT.values())


def _functions(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function and method in one file, nested ones included."""
    out: list[tuple[int, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((child.end_lineno - child.lineno + 1, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(), str(path)), "")
    return out


def test_no_function_is_60_lines_or_longer():
    found = [
        (n, f"{path.relative_to(ROOT).as_posix()}::{name}")
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for n, name in _functions(path)
    ]
    assert len(found) > 100, "the scan found almost no functions"
    n, where = max(found)
    print(f"\nlongest function: {where} ({n} lines; the limit is under {MAX_FUNCTION_LINES})")
    too_long = sorted(((n, w) for n, w in found if n >= MAX_FUNCTION_LINES), reverse=True)
    assert not too_long, f"functions of {MAX_FUNCTION_LINES} lines or more (split them):\n" + "\n".join(
        f"{w}: {n} lines" for n, w in too_long
    )
