"""Processes as /proc shows them, for tests that check what a process left running."""

from __future__ import annotations

from pathlib import Path


def children(parent: int) -> dict[int, str]:
    """The processes whose parent is ``parent``: pid -> command line (arguments joined by spaces)."""
    found = {}
    for proc in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not proc.name.isdigit():
            continue
        try:
            ppid = int(proc.joinpath("stat").read_bytes().rsplit(b")", 1)[1].split()[1])
            command = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent:
            found[int(proc.name)] = command.strip()
    return found
