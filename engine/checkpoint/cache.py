"""The on-disk cache of derived model folders (GGUF conversions, tiny checkpoints).

A folder is built in a temporary sibling and renamed into place, so a reader
never sees half of one, and two processes building the same folder at once
(two expert-parallel ranks starting together) both end with the complete one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$LEVANTE_CACHE_DIR``, else ``~/.cache/levante``."""
    env = os.environ.get("LEVANTE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "levante"


def build_once(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool], doing: str) -> Path:
    """``final``, calling ``build(tmp_dir)`` first unless a complete folder is already there.

    ``doing`` says what a first build does, for the one progress line (e.g. "converting x.gguf to safetensors").
    """
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"levante: {doing} in {final} (one time)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if final.exists() and not is_complete(final):
            shutil.rmtree(final, ignore_errors=True)  # a stale partial folder from outside this function
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
