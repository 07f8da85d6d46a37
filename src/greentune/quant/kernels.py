"""Native CPU dequantise kernels, and when to use them.

A quantised layer is dequantised on every forward and again in backward, so on CPU the speed of
``fmt.dequantize`` is most of what a quantised base costs over an fp32 one. In plain torch each
format's dequantise is 5–10 passes over the weight (unpack, cast, scale, shift, concatenate).
`kernels.c` does it in one pass per block: a few lines of C per format, built on first use with
the system C compiler (``cc -O3 -march=native -ffp-contract=off``, ~0.3 s, cached under
``~/.cache/greentune/``), called through ctypes (no torch headers, no extra process memory).
The values are the plain-torch ones bit for bit (same fp32 operations in the same order, no
fused multiply-add); tests check it.

Measured on a shared 2-core EPYC, one thread, 5632×2048 weights (min of 5; machine load ~2–4):

====  ===========  ======  ===========================================
fmt   plain torch  native  torch.compile (inductor), measured and dropped
====  ===========  ======  ===========================================
q4_k     74 ms     4.6 ms  ~20 ms, +150 MB RSS for dynamo/inductor
q6_k    289 ms      12 ms  ~25 ms
q8_0     68 ms     3.9 ms  ~60 ms (int8 loads not vectorised)
q4_0    122 ms      11 ms  —
nf4     173 ms     6.5 ms  — (35 ms when its 46 MB output is a fresh allocation: page faults)
====  ===========  ======  ===========================================

torch.compile was tried first: its kernels were 3–5× slower than these (the uint8 → float
conversion is not vectorised well) and importing dynamo/inductor cost ~150 MB of resident
memory, a third of a 0.5 B model's whole Q4_K budget.

Policy, `GREENTUNE_QUANT_COMPILE`: ``auto`` / ``1`` (default): native kernels for every CPU
dequantise of a format that has one (Q8_0, Q4_0, Q4_K, Q6_K, NF4; not NF4 with double
quantisation, whose scales span rows) when they can be built; ``0``:
plain torch only. Without a C compiler (or if the build fails) it falls back to plain torch with
one warning. Other devices always use the torch functions.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "GREENTUNE_QUANT_COMPILE"
SOURCE = Path(__file__).with_name("kernels.c")
FORMATS = ("q8_0", "q4_0", "q4_k", "q6_k", "nf4")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]

_lib: "ctypes.CDLL | None | bool" = False        # False: not tried yet; None: unavailable
_lock = threading.Lock()


def mode() -> str:
    """The policy from the environment: ``native`` (default) or ``never``."""
    v = os.environ.get(ENV, "auto").strip().lower()
    return "never" if v in ("0", "false", "no", "off", "never") else "native"


def wanted(fmt, device: torch.device, layer_weights: int = 0) -> bool:
    """Whether to dequantise `fmt` on `device` with the native kernels (if they build)."""
    return device.type == "cpu" and fmt.name in FORMATS and mode() == "native"


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "greentune"


def _build() -> "ctypes.CDLL | None":
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        src = SOURCE.read_bytes()                       # (package data: see pyproject's package-data)
        key = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
        path = _cache_dir() / f"quant-kernels-{key}.so"
        if not path.exists():
            if cc is None:
                raise RuntimeError("no C compiler (cc, gcc or clang) found")
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                r = subprocess.run([cc, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "cc failed")
                os.replace(out, path)                       # atomic: concurrent builders agree
        lib = ctypes.CDLL(str(path))
        for name in FORMATS:
            fn = getattr(lib, f"gt_dequant_{name}")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None
    except Exception as exc:  # noqa: BLE001 - any failure: plain torch
        logger.warning("native dequantise kernels unavailable (%s: %s); using plain torch",
                       type(exc).__name__, exc)
        return None
    return lib


def library() -> "ctypes.CDLL | None":
    """The native kernels (built on first use), or None where they cannot be built."""
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _build()
    return _lib


def dequantize_blocks(fmt, blocks: torch.Tensor, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """``fmt._dequantize_blocks(blocks)`` (uint8 ``[n, type_size]`` → fp32 ``[n, block_size]``),
    by the native kernel when there is one for `fmt` on this device.

    `out`: a contiguous fp32 ``[n, block_size]`` tensor to write into (and return) instead of
    allocating one, so a caller dequantising many chunks reuses one buffer."""
    lib = library() if blocks.device.type == "cpu" and fmt.name in FORMATS else None
    if out is not None and (tuple(out.shape) != (blocks.shape[0], fmt.block_size)
                            or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous float32 {(blocks.shape[0], fmt.block_size)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if lib is None:
        w = fmt._dequantize_blocks(blocks)
        return w if out is None else out.copy_(w)
    blocks = blocks.contiguous()
    if out is None:
        out = torch.empty(blocks.shape[0], fmt.block_size, dtype=torch.float32)
    if blocks.shape[0]:
        getattr(lib, f"gt_dequant_{fmt.name}")(blocks.data_ptr(), out.data_ptr(), blocks.shape[0])
    return out
