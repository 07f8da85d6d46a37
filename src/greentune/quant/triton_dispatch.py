"""When the quantised layers use the Triton kernels, and the glue that calls them.

On CUDA a quantised product (a `QuantLinear`, a quantised tied head, a `QuantExperts3D` in
`SparseExperts`' grouped path) runs one of two ways, picked per product by `choose`:

* ``fused``: `triton_matmul`'s dequantise-in-the-GEMM kernels, which read the packed blocks and
  never materialise the weight: best where the weight's bytes dominate (few rows per weight);
* ``dequant``: `triton_dequant` writes the whole weight (all experts of a layer, for the grouped
  path) in the compute dtype into one buffer kept per device and dtype, then cuBLAS
  (`F.linear` / `F.grouped_mm`) multiplies: best where the GEMM dominates (many rows), since
  the dequantised weight is then read once per GEMM, not once per row tile. The buffer stays
  as large as the largest weight so served: for the grouped path all of a layer's experts,
  1.9 GB in bf16 for Mixtral 8x7B's gate_up ``[8, 28672, 4096]``.

`GREENTUNE_TRITON`: ``auto`` (default: on CUDA when triton imports, ``fused`` for products of at
most `FUSED_MAX_ROWS` rows per weight, else ``dequant``), ``fused`` or ``dequant`` (that path
for every product), ``never`` / ``0`` (plain-torch dequantise, as without triton). Where triton
is missing, or on any other device, nothing changes: the CPU keeps the C kernels (`kernels`).
The one exception is for tests: with ``TRITON_INTERPRET=1`` and ``fused`` or ``dequant`` the
CPU runs the kernels under Triton's interpreter.

Only formats the kernels know (`triton_dequant.supported`: Q8_0, Q4_0, Q4_K, Q6_K, NF4) take
these paths; NF4 with double quantisation and the F16/F32 fallbacks stay in plain torch.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV = "GREENTUNE_TRITON"
#: ``auto`` takes the fused kernels for products of at most this many rows per weight (a
#: provisional crossover: benchmarks/gpu_headline.py's GEMM step measures it on the card).
FUSED_MAX_ROWS = 64

_modules: tuple | None | bool = False  # False: not tried; None: triton unavailable
_buffers: dict[tuple, torch.Tensor] = {}


def mode() -> str:
    """The policy from the environment: ``auto``, ``fused``, ``dequant`` or ``never``."""
    v = os.environ.get(ENV, "auto").strip().lower()
    if v in ("0", "false", "no", "off", "never"):
        return "never"
    return v if v in ("fused", "dequant") else "auto"


def _kernels():
    """``(triton_dequant, triton_matmul)``, or None when triton cannot be imported (logged once)."""
    global _modules
    if _modules is False:
        try:
            from greentune.quant import triton_dequant, triton_matmul

            _modules = (triton_dequant, triton_matmul)
        except Exception as exc:  # noqa: BLE001 - no triton, or a broken install: plain torch
            logger.info(
                "Triton kernels unavailable (%s: %s); quantised layers dequantise in plain torch",
                type(exc).__name__,
                exc,
            )
            _modules = None
    return _modules


def enabled(device: torch.device, fmt) -> bool:
    """Whether products on `device` with weights in `fmt` go to the Triton kernels."""
    m = mode()
    if m == "never":
        return False
    if device.type != "cuda":
        interpreted = device.type == "cpu" and m != "auto" and os.environ.get("TRITON_INTERPRET") == "1"
        if not interpreted:
            return False
    kernels = _kernels()
    return kernels is not None and kernels[0].supported(fmt)


def choose(rows_per_weight: int) -> str:
    """``fused`` or ``dequant`` for a product with `rows_per_weight` activation rows per weight
    (the mean over experts for a grouped product); `GREENTUNE_TRITON` may force either."""
    m = mode()
    if m in ("fused", "dequant"):
        return m
    return "fused" if rows_per_weight <= FUSED_MAX_ROWS else "dequant"


def _buffer(device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
    """The kept dequantise buffer for (device, dtype), at least `n` elements. Products on a
    device's stream run in order, so each weight is consumed before the next overwrites it."""
    key = (device, dtype)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        _buffers.pop(key, None)  # free the old one before allocating the new
        buf = _buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def dequantize(fmt, q: torch.Tensor, shape, dtype: torch.dtype = torch.float32):
    """``fmt.dequantize(q, shape).to(dtype)`` (the same bits) by the Triton kernel, as a new
    tensor; None where the kernels are not used for q's device and format."""
    if not enabled(q.device, fmt):
        return None
    return _kernels()[0].dequantize(fmt, q, shape, dtype)


# ---- linear layers ---------------------------------------------------------------------------


def _linear_plan(a: torch.Tensor, owner, key):
    """``(q, fmt, (out, in))`` when this product goes to the kernels, else None."""
    if a.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None  # the common CPU case, before any indexing
    q, fmt, shape = owner._packed(key)
    if (
        q.dim() != 2
        or not enabled(a.device, fmt)
        or a.dtype not in (torch.float32, torch.bfloat16, torch.float16)
    ):
        return None
    return q, fmt, shape


def linear(x: torch.Tensor, owner, key):
    """``x · Ŵᵀ`` by the kernels for `owner`'s weight `key` (see `linear.dequant_linear`), or
    None where they are not used."""
    plan = _linear_plan(x, owner, key)
    if plan is None:
        return None
    q, fmt, (out, inp) = plan
    rows = x.numel() // inp
    if choose(rows) == "fused":
        return _kernels()[1].linear_forward(x, fmt, q, out, inp)
    w = _kernels()[0].dequantize(fmt, q, (out, inp), x.dtype, out=_buffer(x.device, x.dtype, out * inp))
    return F.linear(x, w)


def linear_input_grad(grad: torch.Tensor, owner, key):
    """``dy · Ŵ`` by the kernels, or None where they are not used."""
    plan = _linear_plan(grad, owner, key)
    if plan is None:
        return None
    q, fmt, (out, inp) = plan
    rows = grad.numel() // out
    if choose(rows) == "fused":
        return _kernels()[1].linear_input_grad(grad, fmt, q, out, inp)
    w = _kernels()[0].dequantize(
        fmt, q, (out, inp), grad.dtype, out=_buffer(grad.device, grad.dtype, out * inp)
    )
    return grad @ w


# ---- grouped experts -------------------------------------------------------------------------


def grouped_ok(x: torch.Tensor, store) -> bool:
    """Whether `grouped_linear` can run `store`'s experts (a `QuantExperts3D`) on rows like x."""
    return (
        store.qweight.dim() == 3
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and enabled(x.device, store.fmt)
        and store.qweight.device == x.device
    )


def _grouped_product(a: torch.Tensor, store, offs: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows of group e times Ŵ_eᵀ (forward) or Ŵ_e (`transposed`: the input gradient)."""
    fmt, q = store.fmt, store.qweight
    E, N, K = store.num_experts, store.out_features, store.in_features
    if choose(a.shape[0] // max(1, E)) == "fused":
        mm = _kernels()[1]
        return (mm.grouped_input_grad if transposed else mm.grouped_forward)(a, fmt, q, offs, N, K)
    w = (
        _kernels()[0]
        .dequantize(fmt, q.reshape(E * N, -1), (E * N, K), a.dtype, out=_buffer(a.device, a.dtype, E * N * K))
        .view(E, N, K)
    )
    return F.grouped_mm(a, w if transposed else w.transpose(-2, -1), offs=offs)


class _GroupedQuantMatmul(torch.autograd.Function):
    """Grouped ``x_g · Ŵ_eᵀ`` saving only the store and the offsets: the backward reads the
    packed experts again (no dequantised weight is kept for it)."""

    @staticmethod
    def forward(ctx, x, store, offs):  # noqa: D102
        ctx.store = store
        ctx.save_for_backward(offs)
        return _grouped_product(x, store, offs, transposed=False)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (offs,) = ctx.saved_tensors
        return _grouped_product(grad.contiguous(), ctx.store, offs, transposed=True), None, None


def grouped_linear(x: torch.Tensor, store, offs: torch.Tensor) -> torch.Tensor:
    """x ``[S, in]`` grouped by expert, offs int32 ``[E]`` group ends → ``[S, out]`` in x's dtype,
    group e times expert e's weight. The caller checks `grouped_ok` first."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GroupedQuantMatmul.apply(x, store, offs)
    return _grouped_product(x.contiguous(), store, offs, transposed=False)
