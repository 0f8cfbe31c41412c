"""C kernels of our own (``kernels/*/csrc``), compiled on first use with the machine's ``cc`` and loaded with ctypes.

Each build is cached per user under a hash of its source, flags and compiler, written atomically so that
concurrent processes are safe. Where the CPU lacks the instructions a kernel needs, or there is no compiler
or writable cache, ``load`` returns None and logs why once; the caller then runs PyTorch's ops instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INCLUDE = Path(__file__).with_name("csrc")  # headers every kernel may include: part of each build's key


@dataclass(frozen=True)
class CKernel:
    name: str  # what it runs, for the warning
    source: Path
    cpu_flags: tuple[str, ...]  # as /proc/cpuinfo names them
    cc_flags: tuple[str, ...]
    declare: Callable[[ctypes.CDLL], ctypes.CDLL]  # sets the functions' argtypes and restype
    fallback: str  # what runs without it


def cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in /proc/cpuinfo ("vendor_id", "flags"); "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def _cache_dirs() -> list[Path]:
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(home) / "levante" / "kernels", Path(tempfile.gettempdir()) / f"levante-kernels-{os.getuid()}"]


def build(kernel: CKernel, cc: str) -> Path:
    """The compiled library for this source, flags and compiler, built once into the first writable cache."""
    version = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    headers = b"".join(h.read_bytes() for h in sorted(INCLUDE.glob("*.h")))
    key = hashlib.sha256(kernel.source.read_bytes() + headers + " ".join(kernel.cc_flags).encode() + version.encode())
    errors = []
    for folder in _cache_dirs():
        target = folder / f"{kernel.source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            cmd = [cc, *kernel.cc_flags, "-I", str(INCLUDE), "-shared", "-fPIC", str(kernel.source), "-o", tmp]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                os.unlink(tmp)
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)  # another process's build of the same key is the same file
            return target
        except OSError as e:
            errors.append(f"{folder}: {e}")
    raise RuntimeError("no writable cache for the compiled kernel: " + "; ".join(errors))


def load(kernel: CKernel) -> ctypes.CDLL | None:
    """The loaded library, or None (the reason logged) where this machine cannot run it."""
    missing = [f for f in kernel.cpu_flags if f not in cpu_flags()]
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or missing:
        reason = f"the CPU lacks {', '.join(missing) or 'x86-64'}"
    elif cc is None:
        reason = "no C compiler (cc) on PATH"
    else:
        try:
            return kernel.declare(ctypes.CDLL(str(build(kernel, cc))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = str(e)
    log.warning("%s off, %s instead: %s", kernel.name, kernel.fallback, reason)
    return None
