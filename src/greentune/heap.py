"""Keep the process's resident memory close to what it holds: glibc heap settings.

Used by both model loaders (fp32/bf16 and quantised), so a training run of either kind gets
freed tensors back to the operating system instead of a fragmented, growing heap.
"""
from __future__ import annotations

import ctypes
import os

#: glibc's ``mallopt`` parameter number for the mmap threshold (malloc.h's M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
#: Allocations from this size up get their own mapping, returned to the OS when freed.
MMAP_THRESHOLD = 1 << 20


def limit_heap_retention(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (``mallopt``); returns
    whether it was set.

    glibc's default threshold is dynamic: each freed mapped block up to 32 MB raises it, so
    after a few frees every activation-sized tensor (1–30 MB) comes from the heap, and the heap
    fragments around the long-lived tensors a training step leaves behind (LoRA gradients,
    optimiser state, the next step's activations): freed space is kept, and resident memory
    grows from step to step. A 0.5 B Q4_K base, LoRA training on CPU, measured ~+130 MB
    resident after 2 steps over what it uses (see benchmarks/quant_memory_speed.py). With a
    fixed threshold tensors of ≥ 1 MB are their own mappings and freed memory goes back to the
    OS; smaller ones stay in the heap (and a fixed threshold also fixes the heap's trim
    threshold at its default, 128 KB). Left alone when the user chose a threshold
    (``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``) and on non-glibc systems.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
