"""Native CPU dequantise and quantise kernels, and when to use them.

A quantised layer is dequantised on every forward and again in backward, so on CPU the speed of
``fmt.dequantize`` is most of what a quantised base costs over an fp32 one. In plain torch each
format's dequantise is 5–10 passes over the weight (unpack, cast, scale, shift, concatenate).
`kernels.c` does it in one pass per block: a few lines of C per format, built on first use with
the system C compiler (``cc -O3 -march=native -ffp-contract=off -fno-trapping-math``, ~0.5 s,
cached under ``~/.cache/greentune/``), called through ctypes (no torch headers, no extra process memory).
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

Quantising (every weight of a base at load time, every tensor of a GGUF export, every ReLoRA
merge) goes through the same library: `quantize_blocks` runs `kernels.c`'s mirror of the
format's plain-torch `_quantize_blocks`, bytes identical, with the blocks split over
`torch.get_num_threads()` threads (ctypes releases the GIL during the call). The K-quant
searches sum in torch's reduction order, which depends on the vector width torch's kernels were
built for; `_probe_lanes` finds that width once by comparing the C reductions with torch's on a
probe, and if none matches, Q4_K/Q6_K quantise in plain torch (with a warning). Q4_K's one
square root per group is torch's own (`torch.sqrt` is MKL's, not correctly rounded), between
two native steps.

Policy, `GREENTUNE_QUANT_COMPILE`: ``auto`` / ``1`` (default): native kernels for every CPU
dequantise and quantise of a format that has one (Q8_0, Q4_0, Q4_K, Q6_K, NF4; not NF4 with
double quantisation, whose scales span rows) when they can be built; ``0``:
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "GREENTUNE_QUANT_COMPILE"
SOURCE = Path(__file__).with_name("kernels.c")
FORMATS = ("q8_0", "q4_0", "q4_k", "q6_k", "nf4")
SUMMING = ("q4_k", "q6_k")  # quantisers whose C sums in torch's order (take `lanes`)
# -fno-trapping-math lets the compiler vectorise selects around divisions (FP exceptions are
# never trapped here); it permits no value-changing transformation, unlike -ffast-math.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-shared", "-fPIC"]
#: Fewest weights one quantise thread is given; smaller tensors use fewer threads.
MIN_WEIGHTS_PER_THREAD = 1 << 15
#: Q4_K blocks per round of its two native steps (bounds the per-group work space to 2 MB).
Q4_K_CHUNK_BLOCKS = 1 << 16

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
_lanes: int | None = None  # torch's summation vector width (see _probe_lanes)
_lock = threading.Lock()


def mode() -> str:
    """The policy from the environment: ``native`` (default) or ``never``."""
    v = os.environ.get(ENV, "auto").strip().lower()
    return "never" if v in ("0", "false", "no", "off", "never") else "native"


def wanted(fmt, device: torch.device, layer_weights: int = 0) -> bool:
    """Whether to dequantise `fmt` on `device` with the native kernels (if they build)."""
    return device.type == "cpu" and fmt.name in FORMATS and mode() == "native"


def quantize_wanted(fmt, device: torch.device) -> bool:
    """Whether to quantise to `fmt` on `device` with the native kernels (if they build)."""
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


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        src = SOURCE.read_bytes()  # (package data: see pyproject's package-data)
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
                os.replace(out, path)  # atomic: concurrent builders agree
        lib = ctypes.CDLL(str(path))
        ptrs = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        for name in FORMATS:
            fn = getattr(lib, f"gt_dequant_{name}")
            fn.argtypes, fn.restype = ptrs, None
            fn = getattr(lib, f"gt_quant_{name}")
            fn.argtypes = {
                "q4_k": [ctypes.c_void_p] + ptrs + [ctypes.c_int64],
                "q6_k": ptrs + [ctypes.c_int64],
            }.get(name, ptrs)
            fn.restype = None
        lib.gt_q4_k_mean_square.argtypes = ptrs + [ctypes.c_int64]
        lib.gt_q4_k_mean_square.restype = None
        lib.gt_probe_reductions.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
        ] + [ctypes.c_void_p] * 3
        lib.gt_probe_reductions.restype = None
    except Exception as exc:  # noqa: BLE001 - any failure: plain torch
        logger.warning(
            "native quantise/dequantise kernels unavailable (%s: %s); using plain torch",
            type(exc).__name__,
            exc,
        )
        return None
    return lib


def _probe_rows() -> torch.Tensor:
    """Rows ``[64, 32]`` that tell reduction orders apart: values of very different sizes (sums
    round differently in another order), and rows of ±0 with only negative (positive) other
    values, where amax (amin) must return the zero torch's order returns."""
    g = torch.Generator().manual_seed(16)
    v = torch.randn(64, 32, generator=g) * torch.exp(3 * torch.randn(64, 32, generator=g))
    pick = torch.randint(0, 3, (32, 32), generator=g)
    zeros = torch.tensor([0.0, -0.0, 1.0])[pick]
    v[32:48], v[48:] = -zeros[:16], zeros[16:]
    return v


def _probe_lanes(lib) -> int | None:
    """The vector width W with which `kernels.c`'s `tsum`/`tminmax` reproduce this torch's
    `sum`/`amax`/`amin` over rows of 16 and 32 floats bit for bit, or None if no W does."""
    rows = _probe_rows()
    for lanes in (8, 16, 4):
        for n in (16, 32):
            x = rows[:, :n].contiguous()
            soa = x.t().contiguous()
            got = [torch.empty(x.shape[0]) for _ in range(3)]
            lib.gt_probe_reductions(soa.data_ptr(), n, x.shape[0], lanes, *(t.data_ptr() for t in got))
            want = (x.sum(dim=1), x.amax(dim=1), x.amin(dim=1))
            if not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want)):
                break
        else:
            return lanes
    logger.warning(
        "this torch sums in an order the native Q4_K/Q6_K quantisers do not reproduce; "
        "they quantise in plain torch"
    )
    return None


def library() -> ctypes.CDLL | None:
    """The native kernels (built on first use), or None where they cannot be built."""
    global _lib, _lanes
    if _lib is False:
        with _lock:
            if _lib is False:
                lib = _build()
                _lanes = _probe_lanes(lib) if lib is not None else None
                _lib = lib
    return _lib


def dequantize_blocks(fmt, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``fmt._dequantize_blocks(blocks)`` (uint8 ``[n, type_size]`` → fp32 ``[n, block_size]``),
    by the native kernel when there is one for `fmt` on this device.

    `out`: a contiguous fp32 ``[n, block_size]`` tensor to write into (and return) instead of
    allocating one, so a caller dequantising many chunks reuses one buffer."""
    lib = library() if blocks.device.type == "cpu" and fmt.name in FORMATS else None
    if out is not None and (
        tuple(out.shape) != (blocks.shape[0], fmt.block_size)
        or out.dtype != torch.float32
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be contiguous float32 {(blocks.shape[0], fmt.block_size)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    if lib is None:
        w = fmt._dequantize_blocks(blocks)
        return w if out is None else out.copy_(w)
    blocks = blocks.contiguous()
    if out is None:
        out = torch.empty(blocks.shape[0], fmt.block_size, dtype=torch.float32)
    if blocks.shape[0]:
        getattr(lib, f"gt_dequant_{fmt.name}")(blocks.data_ptr(), out.data_ptr(), blocks.shape[0])
    return out


def quantize_blocks(fmt, blocks: torch.Tensor) -> torch.Tensor:
    """``fmt._quantize_blocks(blocks)`` (fp32 ``[n, block_size]`` → uint8 ``[n, type_size]``),
    by the native kernel when there is one for `fmt` on this device: the same bytes, with the
    blocks split over up to `torch.get_num_threads()` threads."""
    lib = library() if blocks.device.type == "cpu" and fmt.name in FORMATS else None
    if lib is None or (fmt.name in SUMMING and _lanes is None):
        return fmt._quantize_blocks(blocks)
    x = blocks.to(torch.float32).contiguous()
    n = x.shape[0]
    out = torch.empty(n, fmt.type_size, dtype=torch.uint8)
    threads = max(1, min(torch.get_num_threads(), n * fmt.block_size // MIN_WEIGHTS_PER_THREAD))
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    xp, qp, bx = x.data_ptr(), out.data_ptr(), 4 * fmt.block_size

    def split(lo: int, hi: int, call) -> None:  # call(lo, hi) on `threads` parts of [lo, hi)
        if pool is None:
            call(lo, hi)
            return
        bounds = [lo + (hi - lo) * i // threads for i in range(threads + 1)]
        list(pool.map(call, bounds[:-1], bounds[1:]))

    try:
        if fmt.name == "q4_k":
            # sqrt(mean x²) per group comes from torch.sqrt itself (MKL's vsSqrt, not correctly
            # rounded), in chunks so the work space stays ~2 MB whatever the tensor size.
            for c0 in range(0, n, Q4_K_CHUNK_BLOCKS):
                c1 = min(n, c0 + Q4_K_CHUNK_BLOCKS)
                ms = torch.empty(c1 - c0, 8)
                mp = ms.data_ptr() - 32 * c0
                split(
                    c0,
                    c1,
                    lambda lo, hi, mp=mp: lib.gt_q4_k_mean_square(
                        xp + bx * lo, mp + 32 * lo, hi - lo, _lanes
                    ),
                )
                av = torch.sqrt(ms)
                ap = av.data_ptr() - 32 * c0
                split(
                    c0,
                    c1,
                    lambda lo, hi, ap=ap: lib.gt_quant_q4_k(
                        xp + bx * lo, ap + 32 * lo, qp + 144 * lo, hi - lo, _lanes
                    ),
                )
        else:
            fn = getattr(lib, f"gt_quant_{fmt.name}")
            extra = (_lanes,) if fmt.name in SUMMING else ()
            split(0, n, lambda lo, hi: fn(xp + bx * lo, qp + fmt.type_size * lo, hi - lo, *extra))
    finally:
        if pool is not None:
            pool.shutdown()
    return out
