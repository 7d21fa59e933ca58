"""glibc's malloc policy for big CPU tensors: the allocator half of the CPU fast paths."""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's own ceilings for its sliding mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) and the
# trim threshold it pairs with it, and its default cap on mmapped chunks.
_GLIBC_MMAP_THRESHOLD_MAX, _GLIBC_MMAP_MAX = 32 << 20, 65536
_allocator_mode = "system"  # this process's; glibc's untouched policy until set_cpu_allocator changes it


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl and others lack them
    except (OSError, AttributeError):
        return None
    return libc


def set_cpu_allocator(mode: str) -> bool:
    """How glibc's malloc treats big CPU tensors; returns False where it cannot be set (not glibc).

    `cache`: never mmap, never trim. By default glibc serves every allocation above its mmap
    threshold (32 MiB at most) with a fresh mmap and unmaps it on free, so each training step
    page-faults its largest activations in anew (v3_small's first expanded map at batch 128 is
    38 MB; v2's are larger). Keeping freed memory, as a caching allocator would, removes those
    faults; the process keeps its peak heap (docs/performance.md has the measured gain).
    `system`: glibc's own policy. In a process that ran `cache` (`mobilebench bench` switches per
    side; an in-process sweep), its steady state is restored: mmap above 32 MiB, trim above 64 MiB,
    cached memory handed back. Not bit-for-bit a fresh process: glibc's threshold stops sliding
    once set.
    """
    global _allocator_mode
    libc = _glibc()
    if libc is None:
        return False
    if mode == _allocator_mode == "system":
        return True
    if mode == "cache":
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    elif mode == "system":
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
    else:
        raise ValueError(f"unknown cpu allocator mode {mode!r}")
    _allocator_mode = mode
    return True
