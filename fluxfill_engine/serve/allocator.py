"""Giving the memory of large inputs back to the system once they are freed.

A request with a large image decodes tens to hundreds of MB of pixels for a moment (its checks, the
copy written to disk while the task waits). glibc's allocator raises its mmap threshold after such
blocks are freed, so the next ones come from its heaps and, freed, stay in the process: a server that
took a few large requests kept their memory for good. A fixed threshold keeps every block of 1 MiB and
more in its own mapping, unmapped when freed (eight queued 36-megapixel tasks: about 940 -> 600 MiB of
VmRSS on the tiny-model server, ``benchmarks/results/serve-load-hostile-cpu.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc map blocks of ``threshold`` bytes and more on their own (freed: given back at once).
    Returns whether it applied (glibc on Linux; elsewhere nothing is changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
