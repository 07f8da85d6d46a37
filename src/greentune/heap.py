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

#: The threshold this process fixed with `limit_heap_retention`, or None (glibc's own rule).
fixed_threshold: int | None = None


def limit_heap_retention(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (``mallopt``); returns
    whether it was set.

    glibc's default threshold is dynamic: each freed mapped block up to 32 MB raises it, so
    after a few frees every activation-sized tensor (1–30 MB) comes from the heap, and the heap
    fragments around the tensors a training step keeps (saved activations, LoRA gradients,
    optimiser state): freed space stays resident and the peak grows from step to step. With
    a fixed threshold tensors of ≥ 1 MB are their own mappings, returned to the OS when freed;
    smaller ones stay in the heap (a fixed threshold also keeps the trim threshold at its
    128 KB default). Left alone when the user chose a threshold (``MALLOC_MMAP_THRESHOLD_`` or
    ``GLIBC_TUNABLES``) and on non-glibc systems.

    Measured with benchmarks/quant_memory_speed.py (582 M-parameter Llama, LoRA r16, batch
    1 × 128, 2-core EPYC VM; peak resident memory above the post-import baseline, q4_k base):

    - glibc's dynamic threshold: 1,050–1,175 MB, growing every step (838, 971, 1,026, 1,050);
      0.39–0.43× of the fp32 base's peak.
    - fixed 1 MB (this setting): 785–795 MB, flat after the first step; 0.31×.
    - fixed 2 MB / 4 MB: 0.37× / 0.36×.
    - 1 MB while loading, then ``malloc_trim(0)`` and 32 MB for training: 1,085 MB after 6
      steps. The fragmentation happens in the training steps (the load's own peak is
      ~450 MB), so a setting for the load alone does not help.
    - 32 MB and ``malloc_trim(0)`` after every optimiser step: 1,001–1,008 MB (one step
      fragments the heap by ~200 MB on its own), and ~110 k page faults per step to bring the
      trimmed pages back.

    The cost of 1 MB: every large temporary is a fresh mapping, faulted in and zeroed when
    first written: ~245 k page faults and ~0.9 s of system time per step for the fp32 base
    (3.9 s a step against 3.0 s with the dynamic threshold, same machine and load). Both
    loaders apply it, so the benchmark's fp32 and q4_k runs pay it alike. The quantised layers
    add no faults of their own: they dequantise into one buffer kept per thread
    (`greentune.quant.linear`); a fresh buffer per product had cost ~125 k more faults and put
    the q4_k step at 1.33–1.40× of fp32's, against 0.88–1.18× (five runs) with the kept buffer.

    Training raises it again after its first step when the run's peak leaves memory to spare
    (`greentune.train.heap_policy`): the faults cost ~30 % of a small model's step.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    if done:
        global fixed_threshold
        fixed_threshold = int(threshold)
    return done
