"""Keep freed host memory for reuse instead of handing it back to the OS every step (glibc).

PyTorch's CPU tensors come from the C library's malloc. With glibc's defaults, a large freed block
at the top of the heap is returned to the OS (trimmed) as soon as more than a few MB are free there,
and blocks above a threshold get their own mmap, unmapped on free. A training step frees most of
its activations at the end of the backward pass, so the next step maps the same memory again and
takes one page fault per 4 KiB page. The MultiMax explicit path saves two (B, H, N, N) tensors
per block for the backward pass, enough to push the heap over glibc's trim threshold where the
softmax-SDPA baseline stays under it: ``scripts/benchmark.py`` reports the faults per step
(column "faults/step"; ``--malloc default`` for glibc's defaults, docs/PERFORMANCE.md).

``tune_malloc()`` raises the trim threshold to 1 GiB and fixes the mmap threshold at glibc's maximum
(32 MiB on 64-bit), so the heap keeps what a step frees and the next step reuses it, as a caching
allocator does (CUDA's does this for device memory; jemalloc / tcmalloc, which Intel recommends
for PyTorch on CPU, do it too). The process's resident memory then stays near its peak. A no-op
where the C library is not glibc, or where another allocator is preloaded (``LD_PRELOAD``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 1 << 30   # bytes free at the heap top before glibc returns them to the OS
MMAP_THRESHOLD = 32 << 20  # blocks at least this large get their own mmap (glibc's maximum on 64-bit)
ALLOCATOR_MODES = ("tuned", "default")

_applied = False


def _glibc():
    """The process's glibc, or None (another C library, or another allocator preloaded)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Apply the thresholds above to this process; True if glibc took both (also on a repeat call)."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _applied


def apply_allocator_mode(mode: str, device_type: str) -> bool:
    """``tuned`` on device type ``cpu``: ``tune_malloc()``; otherwise malloc stays as it is (a GPU
    run's host memory is not its hot path). Whether tuning is active."""
    if mode not in ALLOCATOR_MODES:
        raise ValueError(f"cpu allocator mode must be one of {ALLOCATOR_MODES}, got {mode!r}")
    return tune_malloc() if mode == "tuned" and device_type == "cpu" else _applied
