"""Compiled CPU dequantisation kernels, and when to use them.

A quantised layer is dequantised on every forward and again in backward, so on CPU the speed of
``fmt.dequantize`` is most of what a quantised base costs over an fp32 one. In plain torch each
format's dequantise is 5–10 passes over the weight (unpack, cast, scale, shift, concatenate);
`torch.compile` (inductor's C++/OpenMP backend, needs a C++ compiler) turns each format's two
steps, `BlockFormat.dequant_kernels` = ``(prep, expand)``, into two fused loops: the per-block
scales (1/16–1/32 of the data) and one vectorised pass that reads the packed bytes and writes
the fp32 weights once. Measured on a 2-core EPYC (one thread, Q4_K 5632×2048, min of 9, the
machine shared): 220 ms eager vs 12 ms compiled when dequantised in 2 MB row chunks.

The kernels are compiled the first time a big layer needs them (tens of seconds once per
machine, then loaded from inductor's on-disk cache in a second or two), with dynamic shapes, so
one kernel pair per format serves every layer and chunk size. They give the eager functions'
values bit for bit (no fused multiply-add contraction; tests check equality).

Policy, `GREENTUNE_QUANT_COMPILE`:

* ``auto`` (default): compiled for CPU layers of at least `COMPILE_MIN_WEIGHTS` weights (1 Mi:
  e.g. a 512×2048 projection), eager below that — so the test suite's tiny models never compile;
* ``1``: compiled for every CPU layer; ``0``: never (plain torch everywhere).

If compiling fails (no compiler, an unsupported torch), the format falls back to eager with
one warning. Accelerators always use the eager functions (their kernels are already fused
enough that dequantising is not the bottleneck there).
"""
from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

ENV = "GREENTUNE_QUANT_COMPILE"
#: Layers at least this big (weights) use the compiled kernels under the ``auto`` policy.
COMPILE_MIN_WEIGHTS = 1 << 20

_compiled: dict[str, "tuple | None"] = {}
_lock = threading.Lock()


def mode() -> str:
    """The policy from the environment: ``auto``, ``always`` or ``never``."""
    v = os.environ.get(ENV, "auto").strip().lower()
    if v in ("1", "true", "yes", "on", "always"):
        return "always"
    if v in ("0", "false", "no", "off", "never"):
        return "never"
    return "auto"


def wanted(fmt, device: torch.device, layer_weights: int) -> bool:
    """Whether a layer of `layer_weights` weights in `fmt` on `device` should use compiled kernels."""
    if device.type != "cpu" or fmt.dequant_kernels is None:
        return False
    m = mode()
    return m == "always" or (m == "auto" and layer_weights >= COMPILE_MIN_WEIGHTS)


def _build(fmt) -> "tuple | None":
    prep, expand = fmt.dequant_kernels
    try:
        cprep = torch.compile(prep, dynamic=True, fullgraph=True)
        cexpand = torch.compile(expand, dynamic=True, fullgraph=True)
        probe = fmt.quantize(torch.linspace(-1, 1, 4 * fmt.block_size).reshape(4, fmt.block_size))
        probe = probe.reshape(-1, fmt.type_size)
        got = cexpand(probe, *cprep(probe))
        if not torch.equal(got, fmt._dequantize_blocks(probe)):
            raise RuntimeError("compiled kernel disagrees with the eager dequantise")
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to the eager functions
        logger.warning("%s: compiled dequantise unavailable (%s: %s); using plain torch",
                       fmt.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    logger.info("%s: compiled dequantise kernels ready", fmt.name)
    return cprep, cexpand


def compiled_kernels(fmt) -> "tuple | None":
    """``(prep, expand)`` compiled for `fmt` (built on first use, None if that failed)."""
    if fmt.name not in _compiled:
        with _lock:
            if fmt.name not in _compiled:
                _compiled[fmt.name] = _build(fmt)
    return _compiled[fmt.name]


def dequantize_blocks(fmt, blocks: torch.Tensor) -> torch.Tensor:
    """``fmt._dequantize_blocks(blocks)`` through the compiled kernels when available (CPU)."""
    k = compiled_kernels(fmt) if blocks.device.type == "cpu" and fmt.dequant_kernels is not None else None
    if k is None:
        return fmt._dequantize_blocks(blocks)
    prep, expand = k
    return expand(blocks, *prep(blocks))
