"""Session-wide hooks for the whole suite."""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.processes import children as child_processes

EXIT_STATUS = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The docs check's count of snippets (tests/test_docs.py), when that module was collected, and the
    threads still alive as the session ends (a native thread running on into interpreter shutdown is
    what makes a process crash after its last test)."""
    module = sys.modules.get("tests.test_docs")
    line = getattr(module, "DOCS_CHECK_SUMMARY", None)
    if line:
        terminalreporter.write_line(line)
    terminalreporter.write_line(_threads_alive())


def _threads_alive() -> str:
    python = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    tasks = Path("/proc/self/task")
    native = Counter(p.joinpath("comm").read_text().strip() for p in tasks.iterdir()) if tasks.exists() else {}
    children = [command[:120] for command in child_processes(os.getpid()).values()]
    return (
        f"threads alive at the end: python {python}; native {dict(sorted(native.items()))}; child processes {children}"
    )


def pytest_configure(config):
    """The shipped HTTP port (frontdoor.http.port: 8000) is one fixed port: every front door the tests
    build without a port of its own binds any free one instead (port 0, read back), so tests never
    collide on it. Set here, before collection, so module-level configs get it too; the shipped
    default is checked in tests/cluster/test_config.py."""
    from cluster.config import HttpConfig

    defaults = HttpConfig.__init__.__defaults__
    assert defaults is not None and defaults[0] == 8000, f"HttpConfig's defaults changed: {defaults}"
    HttpConfig.__init__.__defaults__ = (0, *defaults[1:])


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with the session's status once it has reported, without the interpreter's finalization.

    Ray (its core worker's threads outlive ``ray.shutdown``), Serve (a handle's event-loop thread) and
    grpc leave native threads running in this process; finalizing the interpreter under them crashed a
    fully green run once (SIGSEGV in a non-main thread, after the summary line). ``levante serve``
    leaves past Ray's exit hooks for the same reason. Child processes still alive here (multiprocessing's
    resource tracker) end on their own when this process's pipes close.
    """
    if EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])
