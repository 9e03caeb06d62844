"""The allocator setting evaluate runs under: a process-wide choice, made by the command and by
evaluate's own worker processes, never by the library for its caller."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process, on glibc: serve blocks up to 32 MiB from the heap (M_MMAP_THRESHOLD) and
    keep up to 256 MiB of freed heap (M_TRIM_THRESHOLD) instead of giving it back to the kernel.
    Evaluate allocates and frees record-sized temporaries thousands of times; a block mapped afresh
    costs a page fault and a zeroing per 4 KiB page (BENCHMARKS.md: 10% of an evaluate on one
    thread). 32 MiB is the most glibc's own dynamic threshold rises to; the heap stays bounded by
    evaluate's peak (one or two records and their draws). True when set; a no-op elsewhere.

    A process-wide setting, so the library never makes it for its caller: ``nmgrad evaluate`` calls
    it, and so do the ``--workers`` processes evaluate starts itself; a Python user may call it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))
