"""glibc's malloc, told to keep the memory a CPU step frees for the next step.

By default glibc serves blocks over its mmap threshold (128 KiB at first, raised as large blocks are freed) with
fresh ``mmap`` s and hands them back on free, so the next step's tensors of that size fault their pages in again:
the kernel zeroes every 4 KiB page on first touch. A prefill's activations are megabytes, made and freed in every
layer. With the threshold fixed at glibc's largest (32 MiB) and the heap trimmed only past 1 GiB free, those
blocks stay in the heap and are reused. The cost: the process holds on to its peak working set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest on 64-bit: bigger blocks still get their own mapping
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Sets the two thresholds; False (logged) where the C library is not glibc or refuses them."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError) as e:
        log.info("malloc left as it is: no glibc mallopt (%s)", e)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.info("malloc left as it is: mallopt refused the thresholds")
    return ok
