"""The suite leaves with its own status, past the interpreter's finalization (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("body", "status"), [("assert True", 0), ("assert False", 1)])
def test_a_session_exits_with_its_status_after_reporting_the_threads_left(tmp_path, body, status):
    (tmp_path / "test_probe.py").write_text(f"def test_probe():\n    {body}\n")
    finalized = tmp_path / "finalized"
    (tmp_path / "conftest.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(finalized)!r}, 'w').close())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == status, result.stdout + result.stderr
    assert "threads alive at the end: python [" in result.stdout, result.stdout
    assert ("1 passed" if status == 0 else "1 failed") in result.stdout
    assert not finalized.exists()  # atexit hooks, run by finalization, were skipped
