"""Fused dequantise-in-the-GEMM Triton kernels: ``x·Ŵᵀ`` and ``dy·Ŵ`` straight from block bytes.

Both products read the weight as packed blocks (`triton_dequant.dequant_tile` on each weight
tile inside the K loop), so the dequantised weight never exists in memory: the traffic is the
packed bytes (4.5 bits a weight for Q4_K) plus the activations.

One kernel per direction serves a plain linear layer and the grouped expert GEMMs alike: the
rows of `x` are grouped by expert, group e being rows ``offs[e-1]:offs[e]`` (``offs`` the group
*ends*, int32 on the device, as `F.grouped_mm` takes them, so no host sync), multiplied by
expert e's weight, ``qweight[e]``. A linear layer is one group. Empty groups cost nothing: each
program finds its (expert, row tile) from `offs`, and the few programs of the grid's upper
bound ``cdiv(S, BM) + E − 1`` that have no tile return at once.

Accumulation is fp32; the weight tile is rounded to the activations' dtype first (bf16/fp16,
round to nearest even, as ``Ŵ.to(dtype)`` is), so results agree with ``x @ Ŵ.to(dtype).T`` to
the accumulation order. fp32 activations use IEEE fp32 products (no TF32), as torch's
default matmul does.

This module imports triton; import it only where triton is installed (`triton_dispatch` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from greentune.quant.triton_dequant import (
    FORMAT_IDS,
    SCALE_GROUP,
    cast_rne,
    code_table,
    dequant_tile,
    launch_options,
    supported,
)

#: Tile sizes (rows of x, weight rows, weight columns) on the GPU. One configuration for every
#: shape; the benchmark's GEMM step measures it against dequantise + cuBLAS.
GPU_TILES = (64, 64, 64)
#: Under Triton's interpreter (CPU tests) each program costs ~ms of Python: bigger tiles, fewer
#: programs. The kernels' masks make every tile size compute the same products.
INTERPRETER_TILES = (32, 64, 128)


def tiles(device: torch.device) -> tuple[int, int, int]:
    """``(BM, BN, BK)`` for launches on `device`."""
    return GPU_TILES if device.type == "cuda" else INTERPRETER_TILES


@triton.jit
def _group_tile(offs_ptr, E, BM: tl.constexpr):
    """This program's (expert, first row, end row) for axis-0 tile ``program_id(0)``;
    expert −1 when the tile index is past the last group's tiles."""
    pid = tl.program_id(0)
    start = 0
    before = 0
    e_sel = -1
    m0 = 0
    m_end = 0
    for e in range(E):
        end = tl.load(offs_ptr + e)
        t = (end - start + BM - 1) // BM
        hit = (pid >= before) & (pid < before + t)
        e_sel = tl.where(hit, e, e_sel)
        m0 = tl.where(hit, start + (pid - before) * BM, m0)
        m_end = tl.where(hit, end, m_end)
        before += t
        start = end
    return e_sel, m0, m_end


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation. UPCAST (set under the interpreter only, whose dot
    multiplies bf16 bit patterns as integers): the 16-bit operands' exact fp32 values instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _forward_kernel(
    x_ptr,
    q_ptr,
    y_ptr,
    offs_ptr,
    code_ptr,
    E,
    N,
    K,
    row_bytes,
    expert_bytes,
    FMT: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """y[rows of group e] = x[rows] · Ŵ_eᵀ; x [S, K], y [S, N], both contiguous."""
    e, m0, m_end = _group_tile(offs_ptr, E, BM)
    if e < 0:
        return
    rm = m0 + tl.arange(0, BM)[:, None]  # [BM, 1]
    q_e = q_ptr + e.to(tl.int64) * expert_bytes
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)[None, :]  # [1, BK]
        x = tl.load(x_ptr + rm.to(tl.int64) * K + rk, mask=(rm < m_end) & (rk < K), other=0.0)
        w = dequant_tile(q_e, row_bytes, N, K, tl.program_id(1) * BN, k0, code_ptr, FMT, BN, BK)  # [BN, BK]
        acc += _dot(x, tl.trans(cast_rne(w, x.dtype)), PREC, UPCAST)
    cn = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]
    tl.store(y_ptr + rm.to(tl.int64) * N + cn, acc.to(y_ptr.dtype.element_ty), mask=(rm < m_end) & (cn < N))


@triton.jit
def _input_grad_kernel(
    g_ptr,
    q_ptr,
    dx_ptr,
    offs_ptr,
    code_ptr,
    E,
    N,
    K,
    row_bytes,
    expert_bytes,
    FMT: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """dx[rows of group e] = dy[rows] · Ŵ_e; dy [S, N], dx [S, K], both contiguous."""
    e, m0, m_end = _group_tile(offs_ptr, E, BM)
    if e < 0:
        return
    rm = m0 + tl.arange(0, BM)[:, None]  # [BM, 1]
    rk = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]  # [1, BK] weight columns
    q_e = q_ptr + e.to(tl.int64) * expert_bytes
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        cn = n0 + tl.arange(0, BN)[None, :]  # [1, BN]
        g = tl.load(g_ptr + rm.to(tl.int64) * N + cn, mask=(rm < m_end) & (cn < N), other=0.0)
        w = dequant_tile(q_e, row_bytes, N, K, n0, tl.program_id(1) * BK, code_ptr, FMT, BN, BK)  # [BN, BK]
        acc += _dot(g, cast_rne(w, g.dtype), PREC, UPCAST)
    tl.store(dx_ptr + rm.to(tl.int64) * K + rk, acc.to(dx_ptr.dtype.element_ty), mask=(rm < m_end) & (rk < K))


def _check(fmt, x: torch.Tensor, q: torch.Tensor, offs: torch.Tensor, N: int, K: int) -> None:
    if not supported(fmt):
        raise ValueError(f"no Triton kernel for {fmt.name}")
    if q.dim() != 3 or tuple(q.shape[1:]) != fmt.packed_shape((N, K)):
        raise ValueError(f"packed experts {tuple(q.shape)} do not hold [E, {N}, {K}] {fmt.name} weights")
    if offs.dim() != 1 or offs.numel() != q.shape[0] or offs.dtype != torch.int32:
        raise ValueError(
            f"offs must be int32 [{q.shape[0]}] group ends, got {offs.dtype} {tuple(offs.shape)}"
        )
    if x.dim() != 2:
        raise ValueError(f"expected 2-D rows, got shape {tuple(x.shape)}")


def _launch(
    kernel, a: torch.Tensor, fmt, q: torch.Tensor, out: torch.Tensor, offs: torch.Tensor, N: int, K: int
) -> torch.Tensor:
    """Run `kernel` (forward: output columns N; input gradient: output columns K) on rows `a`."""
    E = q.shape[0]
    BM, BN, BK = tiles(a.device)
    assert BK % SCALE_GROUP[fmt.name] == 0, (BK, fmt.name)  # dequant_tile's layout
    cols, block_cols = (N, BN) if kernel is _forward_kernel else (K, BK)
    if a.shape[0] == 0 or cols == 0:
        return out
    prec = "ieee" if a.dtype == torch.float32 else "tf32"  # (ignored for 16-bit inputs)
    row_bytes = K // fmt.block_size * fmt.type_size
    grid = (triton.cdiv(a.shape[0], BM) + E - 1, triton.cdiv(cols, block_cols))
    kernel[grid](
        a,
        q,
        out,
        offs,
        code_table(a.device),
        E,
        N,
        K,
        row_bytes,
        N * row_bytes,
        FMT=FORMAT_IDS[fmt.name],
        PREC=prec,
        UPCAST=not a.is_cuda and a.dtype != torch.float32,
        BM=BM,
        BN=BN,
        BK=BK,
        **launch_options(),
    )
    return out


def grouped_forward(
    x: torch.Tensor, fmt, q: torch.Tensor, offs: torch.Tensor, N: int, K: int
) -> torch.Tensor:
    """``y[g] = x[g] · Ŵ_eᵀ`` for each group g of rows: x ``[S, K]`` grouped by expert, q uint8
    ``[E, *fmt.packed_shape((N, K))]``, offs int32 ``[E]`` group ends (``offs[-1] == S``) → ``[S, N]``
    in x's dtype. Rows past ``offs[-1]`` are left unwritten."""
    _check(fmt, x, q, offs, N, K)
    x, q = x.contiguous(), q.contiguous()
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    return _launch(_forward_kernel, x, fmt, q, y, offs, N, K)


def grouped_input_grad(
    grad: torch.Tensor, fmt, q: torch.Tensor, offs: torch.Tensor, N: int, K: int
) -> torch.Tensor:
    """``dx[g] = dy[g] · Ŵ_e`` for each group g: grad ``[S, N]`` → ``[S, K]`` in grad's dtype."""
    _check(fmt, grad, q, offs, N, K)
    grad, q = grad.contiguous(), q.contiguous()
    dx = torch.empty(grad.shape[0], K, dtype=grad.dtype, device=grad.device)
    return _launch(_input_grad_kernel, grad, fmt, q, dx, offs, N, K)


def linear_forward(x: torch.Tensor, fmt, q: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """``x · Ŵᵀ`` for one packed weight q ``fmt.packed_shape((N, K))``: x ``[..., K]`` → ``[..., N]``."""
    x2 = x.reshape(-1, K)
    offs = torch.full((1,), x2.shape[0], dtype=torch.int32, device=x.device)
    return grouped_forward(x2, fmt, q.unsqueeze(0), offs, N, K).view(*x.shape[:-1], N)


def linear_input_grad(grad: torch.Tensor, fmt, q: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """``dy · Ŵ`` for one packed weight: grad ``[..., N]`` → ``[..., K]``."""
    g2 = grad.reshape(-1, N)
    offs = torch.full((1,), g2.shape[0], dtype=torch.int32, device=grad.device)
    return grouped_input_grad(g2, fmt, q.unsqueeze(0), offs, N, K).view(*grad.shape[:-1], K)
