"""`QuantLinear`: a frozen linear layer whose weight is stored packed in a block format.

``y = x · Ŵᵀ + b`` where ``Ŵ = fmt.dequantize(qweight)`` is rebuilt on each forward (and again
in backward) and never kept: the layer's memory is the packed bytes, e.g. 4.5 bits per weight
for Q4_K, plus an optional fp32 bias. On CPU a big weight is rebuilt a block of rows at a time
(`CHUNK_WEIGHTS`), each block multiplied while it is in cache, dequantised by the native
kernels (`kernels`) into one buffer kept per thread; on CUDA the Triton kernels do the
products (`triton_dispatch`: fused dequantise-in-the-GEMM, or dequantise + cuBLAS). Gradients
flow to the input (and the bias, if it requires them), never to the packed weight: LoRA
adapters sit on top.

Compute dtype: fp32 on CPU (whatever the input dtype; the output is cast back to it), the
input's dtype elsewhere (bf16/fp16 on GPUs, where those are fast).

`add_(delta)` merges an update into the frozen weight: dequantise → add → re-quantise in place
(ReLoRA's merge). `raw_bytes()` is the GGUF tensor data of the weight, byte for byte.
"""

from __future__ import annotations

import logging
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from greentune.quant import kernels, triton_dispatch
from greentune.quant.block import BlockFormat
from greentune.quant.formats import fallback_format, get_format

logger = logging.getLogger(__name__)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 on CPU (no fast bf16 units assumed), the input's floating dtype elsewhere."""
    if x.device.type == "cpu" or not x.dtype.is_floating_point:
        return torch.float32
    return x.dtype


#: On CPU a big weight is dequantised and multiplied this many weights (4 MB fp32) at a time,
#: a block of rows, so the transient stays in cache and small (a 32000×2048 lm_head would
#: otherwise materialise 262 MB fp32 twice per step). Measured on a 2-core EPYC, Q4_K
#: 5632×2048, batch 128: 256-row (2 MB) chunks cost the matmul + 20–30 %, a whole-weight
#: dequantise + matmul twice that (page faults on the fresh 46 MB buffer, a DRAM round trip).
CHUNK_WEIGHTS = 1 << 20


def _rows_per_chunk(out_features: int, in_features: int) -> int:
    return max(16, CHUNK_WEIGHTS // max(1, in_features))


class _DequantMatmul(torch.autograd.Function):
    """``x · Ŵᵀ`` that saves only the packed weight for backward, not the dequantised one.

    Plain `F.linear(x, dequantize())` would keep every layer's full-precision Ŵ alive until
    backward, i.e. the fp32 model's size, undoing the point of quantising.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, owner, key) -> torch.Tensor:  # noqa: D102
        ctx.owner, ctx.key = owner, key
        return _forward(x, owner, key)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _input_grad(grad, ctx.owner, ctx.key), None, None


def _chunked(owner, key, x: torch.Tensor):
    """``(packed rows [out, row_bytes], fmt, (out, in), rows per chunk, native)`` when this
    product should run in row chunks (CPU, fp32, row-local format; a weight of one chunk or
    less is one chunk, so it too is dequantised into the kept buffer)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    q, fmt, (out, inp) = owner._packed(key)
    if not fmt.row_local or q.dim() != 2:
        return None
    rows = min(out, _rows_per_chunk(out, inp))  # one chunk for a small weight: same buffer
    return q, fmt, (out, inp), rows, kernels.wanted(fmt, x.device, out * inp)


_scratch = threading.local()


def _dequant_buffer(n: int) -> torch.Tensor:
    """This thread's fp32 dequantise buffer, at least `n` floats, kept between calls.

    A chunked product writes every chunk of its weight into this one buffer, and every
    product on the thread reuses it: a few MB allocated once per thread instead of once per
    call (~140 calls per step, forward and backward, for the 0.5 B model). A fresh buffer per
    call is its own mapping under `greentune.heap`'s 1 MB mmap threshold, and touching it
    faults in and zeroes 1,000 new pages each time: measured ~125 k page faults and ~0.8 s per
    step on the benchmark's 582 M-parameter model (benchmarks/quant_memory_speed.py)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n]


def _chunk_weights(fmt, q: torch.Tensor, out: int, inp: int, rows: int, native: bool):
    """Yield ``(r0, r1, Ŵ[r0:r1])`` over row chunks. With the native kernels every chunk is
    written into this thread's one dequantise buffer (`_dequant_buffer`), so a chunk must be
    used before the next one is asked for (and before another chunked product runs)."""
    buf = _dequant_buffer(rows * inp) if native and kernels.library() is not None else None
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        if buf is None:
            yield r0, r1, fmt.dequantize(q[r0:r1], (r1 - r0, inp), native=native)
        else:
            n = (r1 - r0) * inp
            blocks = q[r0:r1].reshape(-1, fmt.type_size)
            kernels.dequantize_blocks(fmt, blocks, out=buf[:n].view(-1, fmt.block_size))
            yield r0, r1, buf[:n].view(r1 - r0, inp)


def _forward(x: torch.Tensor, owner, key) -> torch.Tensor:
    y = triton_dispatch.linear(x, owner, key)  # CUDA: the Triton kernels
    if y is not None:
        return y
    plan = _chunked(owner, key, x)
    if plan is None:
        return F.linear(x, owner._weight(key, x.dtype))
    q, fmt, (out, inp), rows, native = plan
    x2 = x.reshape(-1, inp)
    y = torch.empty(x2.shape[0], out, dtype=x.dtype, device=x.device)
    for r0, r1, w in _chunk_weights(fmt, q, out, inp, rows, native):
        torch.mm(x2, w.t(), out=y[:, r0:r1])  # y's rows have stride `out`: BLAS's ldc
    return y.view(*x.shape[:-1], out)


def _input_grad(grad: torch.Tensor, owner, key) -> torch.Tensor:
    gx = triton_dispatch.linear_input_grad(grad, owner, key)
    if gx is not None:
        return gx
    plan = _chunked(owner, key, grad)
    if plan is None:
        return grad @ owner._weight(key, grad.dtype)
    q, fmt, (out, inp), rows, native = plan
    g2 = grad.reshape(-1, out)
    gx = torch.empty(g2.shape[0], inp, dtype=grad.dtype, device=grad.device)
    for r0, r1, w in _chunk_weights(fmt, q, out, inp, rows, native):
        if r0 == 0:
            torch.mm(g2[:, r0:r1], w, out=gx)
        else:
            gx.addmm_(g2[:, r0:r1], w)
    return gx.view(*grad.shape[:-1], inp)


def dequant_linear(x: torch.Tensor, owner, key=None) -> torch.Tensor:
    """``x · Ŵᵀ`` for ``owner``'s weight `key`, x already in the compute dtype.

    `owner` provides ``_weight(key, dtype)`` (the whole dequantised weight) and ``_packed(key)``
    → ``(uint8 rows, fmt, (out, in))``; on CPU big weights are done in row chunks (`CHUNK_WEIGHTS`)
    with the native kernels where `kernels.wanted` says so.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _DequantMatmul.apply(x, owner, key)
    return _forward(x, owner, key)


class PackedMatrix(nn.Module):
    """A frozen 2-D weight ``weight_shape`` kept as block-format bytes in the `qweight` buffer.

    What a quantised linear layer and a quantised embedding table have in common: quantise
    into the buffer, dequantise it, merge an update (dequantise → add → re-quantise), hand
    out the raw GGUF bytes, and serve `dequant_linear` as its weight owner. Subclasses set
    `fmt` and register `qweight`, and define `weight_shape`.
    """

    fmt: BlockFormat
    qweight: torch.Tensor
    weight_shape: tuple[int, int]  # a property of each subclass

    @torch.no_grad()
    def load_weight_(self, weight: torch.Tensor) -> None:
        """Quantise `weight` (``weight_shape``) into the buffer, in place."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {self.weight_shape}")
        self.qweight.copy_(self.fmt.quantize(weight.to(self.qweight.device, torch.float32)))

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 ``weight_shape``."""
        w = triton_dispatch.dequantize(self.fmt, self.qweight, self.weight_shape)  # CUDA: same bits
        if w is not None:
            return w
        return self.fmt.dequantize(
            self.qweight,
            self.weight_shape,
            native=kernels.wanted(self.fmt, self.qweight.device, math.prod(self.weight_shape)),
        )

    @torch.no_grad()
    def add_(self, delta: torch.Tensor) -> PackedMatrix:
        """``W ← Q(Ŵ + delta)`` in place; delta has ``weight_shape``. Returns self."""
        if tuple(delta.shape) != self.weight_shape:
            raise ValueError(f"delta shape {tuple(delta.shape)} != {self.weight_shape}")
        self.load_weight_(self.dequantize() + delta.to(self.qweight.device, torch.float32))
        return self

    def raw_bytes(self) -> torch.Tensor:
        """The packed weight, uint8 — GGUF's tensor data for type `fmt.ggml_type`, shape
        ``[rows, cols/block·type_size]`` (GGUF dims ``[cols, rows]``)."""
        return self.qweight

    # the `dequant_linear` owner interface
    def _weight(self, key, dtype: torch.dtype) -> torch.Tensor:
        w = self.dequantize()
        return w if dtype == torch.float32 else w.to(dtype)

    def _packed(self, key):
        return self.qweight, self.fmt, self.weight_shape


class QuantLinear(PackedMatrix):
    """A frozen `nn.Linear` stored in a block format.

    Attributes:
        in_features, out_features: as nn.Linear.
        fmt: the `BlockFormat` actually used (a fallback when the requested one's blocks do
            not fit `in_features`, see `formats.fallback_format`).
        qweight: uint8 buffer, ``fmt.packed_shape((out_features, in_features))``; in the
            state dict, so checkpoints keep the (possibly merged) quantised base.
        bias: fp32 `nn.Parameter` ``[out_features]`` (frozen) or None.
    """

    def __init__(
        self, in_features: int, out_features: int, fmt: str | BlockFormat, bias: bool = False, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt = get_format(fmt)
        shape = self.fmt.packed_shape((self.out_features, self.in_features))
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str | BlockFormat) -> QuantLinear:
        """Quantise `linear.weight` (falling back per `fallback_format`, logged) into a new layer."""
        wanted = get_format(fmt)
        used = fallback_format(wanted, linear.in_features)
        if used is not wanted:
            logger.info(
                "in_features %d is not a multiple of %s's block %d: storing %s instead",
                linear.in_features,
                wanted.name,
                wanted.block_size,
                used.name,
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            used,
            bias=linear.bias is not None,
            device=linear.weight.device,
        )
        layer.load_weight_(linear.weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    # ---- the weight ----------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    # ---- compute ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        y = dequant_linear(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={self.fmt.name}, bias={self.bias is not None}"
        )
