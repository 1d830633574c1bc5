"""Handing memory the process has freed back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the OS (glibc keeps it otherwise).

    Freed KV caches and load-time buffers are many mid-sized blocks that glibc keeps in its heaps: without
    this a stage's RSS stays at its high-water mark after its jobs end (measured: 1.38x its weights after
    16 jobs of 576 tokens had ended, 1.10x after a trim) and a load that converted dtypes keeps ~5% of
    its weights as free heap. A trim walks the whole heap (measured 60-600 ms for a 1.3 GB heap of small
    blocks on a busy machine): call it when a stage goes idle, not per step or per job. While jobs run,
    glibc reuses the freed blocks for new caches, so RSS stays at the working set anyway.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
