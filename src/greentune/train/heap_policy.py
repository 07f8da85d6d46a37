"""The host allocator during training steps: fast where memory allows, flat where it must.

The loaders fix glibc's mmap threshold at 1 MB (`greentune.heap`) so that a run whose memory
is tight keeps a flat resident set. That costs time in every step: each large temporary is a
fresh mapping, faulted in and zeroed when first written. Measured (2-core EPYC VM,
2026-12-02, bench Mixtral 4 × h512, 8 experts top-2, batch 4 × 256, one thread): 228–262 k
minor faults and +0.52–0.57 s of system time per step (~30 % of a 1.7 s step) against
4–13 k faults and 0.01–0.06 s with the threshold at glibc's own ceiling (32 MB), for a peak
RSS of 1,187 MB instead of 957 MB (1.24×).

So after the first step of a session, when this process's peak resident memory so far
(ru_maxrss: the load and one whole step) is at most `RELAX_FRACTION` of the memory it may use
(`plan.hardware.run_memory_bytes`), the threshold is raised to 32 MB for the rest of the run,
which is what glibc's dynamic rule reaches after a few frees; with the 1.24–1.5× growth
measured for that setting (here and in `greentune.heap`), the run then still stays under
~40 % of that memory. Otherwise the 1 MB setting stays. Numerics are untouched (resume stays
bit-identical); only the host heap changes. Nothing happens when no loader fixed the
threshold (a user's `MALLOC_MMAP_THRESHOLD_`, a non-glibc system) or on an accelerator (its
activations are not in the host heap). `GREENTUNE_TRAIN_HEAP=flat` keeps the 1 MB setting
whatever the memory (the smallest peak, e.g. to compare memory with
`benchmarks/quant_memory_speed.py`); `fast` raises it whatever the memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys

from greentune import heap

log = logging.getLogger(__name__)

RELAX_FRACTION = 0.25
RELAXED_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
ENV = "GREENTUNE_TRAIN_HEAP"  # auto (default) | flat | fast
_M_TRIM_THRESHOLD = -1  # malloc.h


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def relax_after_first_step(device) -> str | None:
    """Raise the mmap threshold when memory allows (see the module docstring); returns the
    logged reason when it did, else None."""
    from greentune.plan.hardware import device_type, run_memory_bytes

    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in ("auto", "flat", "fast"):
        log.warning("%s=%r is not auto, flat or fast; using auto", ENV, mode)
        mode = "auto"
    if mode == "flat" or heap.fixed_threshold is None or heap.fixed_threshold >= RELAXED_THRESHOLD:
        return None
    if device_type(device) != "cpu":
        return None
    available, source = run_memory_bytes("cpu")
    peak = peak_rss_bytes()
    if mode == "auto" and peak > RELAX_FRACTION * available:
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(heap._M_MMAP_THRESHOLD, RELAXED_THRESHOLD):
        return None
    # A fixed mmap threshold switches off glibc's dynamic rule, which would also raise the trim
    # threshold to twice it; without that, a freed temporary at the top of the heap is handed
    # back to the OS (the 128 KB default) and faults in again, depending on the heap's layout.
    mallopt(_M_TRIM_THRESHOLD, 2 * RELAXED_THRESHOLD)
    heap.fixed_threshold = RELAXED_THRESHOLD
    why = (
        f"{ENV}=fast"
        if mode == "fast"
        else f"peak RSS {peak / 2**30:.2f} GB <= {RELAX_FRACTION:g} × {available / 2**30:.1f} GB, {source}"
    )
    reason = f"host heap: mmap threshold raised to {RELAXED_THRESHOLD >> 20} MB for training ({why})"
    log.info(reason)
    return reason
