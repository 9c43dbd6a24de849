"""Process-wide settings that make CPU training and evaluation faster without touching the math."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OPT_OUT = "NVAE_SEARCH_DEFAULT_MALLOC"
_done: list[bool] = []


def tune_allocator() -> bool:
    """Keep freed activation buffers in glibc's heap instead of handing them back to the kernel.

    By default glibc serves every allocation above a few MiB with a fresh ``mmap`` and unmaps it on free, so each
    large activation of every forward pass is page-faulted in and zeroed again; on CPU that costs 15-40 % of a
    training step or an evaluation pass of NVAE (measured: README, "Benchmarks"). Raising the mmap and trim
    thresholds keeps those pages mapped; the process's resident memory then stays at its peak instead of
    shrinking between steps. Linux/glibc only; set ``NVAE_SEARCH_DEFAULT_MALLOC=1`` to leave glibc as it is.
    Returns whether the thresholds were changed (idempotent)."""
    if _done:
        return _done[0]
    changed = False
    if sys.platform.startswith("linux") and not os.environ.get(_OPT_OUT):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # musl and other libcs have no mallopt
            mallopt = None
        if mallopt is not None:
            # glibc caps the mmap threshold (32 MiB on 64-bit in recent versions); try high, then the cap.
            mmap_ok = any(mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in (1 << 30, 32 << 20))
            trim_ok = mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
            changed = mmap_ok and trim_ok
    _done.append(changed)
    return changed
