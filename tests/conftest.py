"""Session-wide hooks for the whole suite."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The docs check's count of snippets (tests/test_docs.py), when that module was collected."""
    module = sys.modules.get("tests.test_docs")
    line = getattr(module, "DOCS_CHECK_SUMMARY", None)
    if line:
        terminalreporter.write_line(line)


def pytest_configure(config):
    """The shipped HTTP port (frontdoor.http.port: 8000) is one fixed port: every front door the tests
    build without a port of its own binds any free one instead (port 0, read back), so tests never
    collide on it. Set here, before collection, so module-level configs get it too; the shipped
    default is checked in tests/cluster/test_config.py."""
    from cluster.config import HttpConfig

    defaults = HttpConfig.__init__.__defaults__
    assert defaults is not None and defaults[0] == 8000, f"HttpConfig's defaults changed: {defaults}"
    HttpConfig.__init__.__defaults__ = (0, *defaults[1:])
