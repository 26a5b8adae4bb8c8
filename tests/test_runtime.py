"""runtime.release_freed_memory: freed heap memory goes back to the OS."""

import ctypes
import os

import pytest

from diffusion_jax import runtime


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_release_freed_memory_returns_heap_holes_to_the_os():
    """Every other 64 KiB block of 128 MiB of touched heap is freed: the holes lie between
    live blocks, so free() cannot shrink the heap and the RSS stays; malloc_trim(0)
    releases the holes' pages. Expect ~64 MiB back; require 32 (page bookkeeping, other
    threads' allocations meanwhile)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("no glibc: release_freed_memory is a no-op here")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 2048  # below glibc's mmap threshold: heap blocks
    blocks = [libc.malloc(size) for _ in range(count)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, size)  # resident
    for b in blocks[::2]:
        libc.free(b)
    before = _rss_mb()
    runtime.release_freed_memory()
    released = before - _rss_mb()
    for b in blocks[1::2]:
        libc.free(b)
    assert released > 32, f"released {released:.1f} MiB of ~64 freed"
