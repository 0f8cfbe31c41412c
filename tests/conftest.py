"""Session-wide hooks for the whole suite."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The docs check's count of snippets (tests/test_docs.py), when that module was collected."""
    module = sys.modules.get("tests.test_docs")
    line = getattr(module, "DOCS_CHECK_SUMMARY", None)
    if line:
        terminalreporter.write_line(line)
