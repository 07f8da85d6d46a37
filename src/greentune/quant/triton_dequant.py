"""Triton dequantise kernels for the block formats (Q4_K, Q6_K, Q8_0, Q4_0, NF4), for CUDA.

`dequant_tile` is the one piece of format knowledge on the GPU: given the packed rows of a weight
and a tile's corner it returns the dequantised fp32 values of that tile, read straight from the
block bytes. The dequantise kernel here writes whole weights with it (into an
`out` buffer the caller can keep), and the fused GEMMs in `triton_matmul` call it on each
weight tile inside their K loop, so a weight is never materialised there.

Values are the plain-torch `fmt.dequantize` ones bit for bit: the same fp32 operations in the
same order (``d·sc`` then ``q·scale − shift`` for Q4_K, ``(d·sc)·(q − 32)`` for Q6_K, …), launched
with ``enable_fp_fusion=False`` so the compiler does not contract them into fused multiply-adds,
and a round-to-nearest-even cast to the output dtype, as ``tensor.to(dtype)`` does.

A tile is laid out ``[rows, groups, weights per group]`` (`SCALE_GROUP`: the run of weights
sharing one scale), so a group's scale bytes are read once and each weight reads only its quant
byte; every format is then a few lines of index arithmetic. The layouts are documented in the
format files (`q4_k.py`, `q6_k.py`, `simple.py`, `nf4.py`). Tests run these kernels under
Triton's interpreter and compile them for sm_90 (tests/quant/test_triton_kernels.py).

This module imports triton; import it only where triton is installed (`triton_dispatch` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from greentune.quant.nf4 import NF4_CODE

#: Format ids for the kernels' `FMT` constexpr.
FORMAT_IDS = {"q8_0": 0, "q4_0": 1, "q4_k": 2, "q6_k": 3, "nf4": 4}
#: Weights per scale group (the unit `dequant_tile` reads scales at); tile widths are multiples.
SCALE_GROUP = {"q8_0": 32, "q4_0": 32, "q4_k": 32, "q6_k": 16, "nf4": 64}
#: Triton dtypes the kernels write.
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_codes: dict[torch.device, torch.Tensor] = {}


def code_table(device: torch.device) -> torch.Tensor:
    """NF4's 16 code values as fp32 on `device` (cached; other formats pass it unused)."""
    t = _codes.get(device)
    if t is None:
        t = _codes[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return t


def supported(fmt) -> bool:
    """Whether the kernels know `fmt` (row-local block formats only: not nf4_dq, f16, f32)."""
    return fmt.name in FORMAT_IDS


def launch_options() -> dict:
    """Keyword options for every launch: no FMA contraction (bit-exact with torch's fp32 ops)."""
    return {"enable_fp_fusion": False}


@triton.jit
def _f16(lo, hi):
    """Two int32 byte values (little-endian) → the fp32 value of that IEEE half."""
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 `v` as `dtype`, rounded to nearest even as torch's ``.to`` rounds.

    bf16 is rounded with integer ops on the fp32 bits (NaN → the canonical quiet NaN, as torch
    gives): the same on the GPU and in Triton's interpreter, whose own fp32 → bf16 cast does
    not round to even."""
    if dtype == tl.float32:
        return v
    elif dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _byte(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def dequant_tile(
    q_ptr, row_bytes, n_rows, n_cols, r0, c0, code_ptr, FMT: tl.constexpr, R: tl.constexpr, C: tl.constexpr
):
    """fp32 ``Ŵ[r0:r0+R, c0:c0+C]`` of a packed ``[n_rows, n_cols]`` weight whose row r starts at
    ``q_ptr + r·row_bytes``; lanes past the weight's edge give 0.

    The tile is built as ``[R, C / G, G]`` for the format's scale group of G weights
    (`SCALE_GROUP`), so the scale bytes are read once per (row, group) and only the quant bytes
    once per weight. c0 and C must be multiples of G. FMT: a `FORMAT_IDS` value.
    """
    G: tl.constexpr = 16 if FMT == 3 else (64 if FMT == 4 else 32)
    rows = r0 + tl.arange(0, R)[:, None, None]
    grp = c0 // G + tl.arange(0, C // G)[None, :, None]  # global group index
    lane = tl.arange(0, G)[None, None, :]
    ms = (rows < n_rows) & (grp * G < n_cols)  # [R, C/G, 1]: scale loads
    mask = ms & (lane < G)  # [R, C/G, G]: quant loads
    row0 = q_ptr + rows.to(tl.int64) * row_bytes
    if FMT == 0:  # Q8_0: 32 weights, f16 d + 32 int8
        base = row0 + grp * 34
        d = _f16(_byte(base, ms), _byte(base + 1, ms))
        q = tl.load(base + 2 + lane, mask=mask, other=0).to(tl.int8, bitcast=True)
        v = q.to(tl.float32) * d
    elif FMT == 1:  # Q4_0: 32 weights, f16 d + 16 nibble bytes
        base = row0 + grp * 18
        d = _f16(_byte(base, ms), _byte(base + 1, ms))
        b = _byte(base + 2 + lane % 16, mask)
        q = tl.where(lane < 16, b & 15, b >> 4)
        v = (q.to(tl.float32) - 8.0) * d
    elif FMT == 2:  # Q4_K: 256 weights in 144 bytes, groups of 32
        base = row0 + (grp // 8) * 144
        g = grp % 8  # group in the super-block: pair g//2, nibble g%2
        gl = g % 4
        d = _f16(_byte(base, ms), _byte(base + 1, ms))
        dmin = _f16(_byte(base + 2, ms), _byte(base + 3, ms))
        lo = _byte(base + 4 + gl, ms)
        mid = _byte(base + 8 + gl, ms)
        hi = _byte(base + 12 + gl, ms)
        sc = tl.where(g < 4, lo & 63, (hi & 15) | ((lo >> 2) & 48))
        mn = tl.where(g < 4, mid & 63, (hi >> 4) | ((mid >> 2) & 48))
        scale = d * sc.to(tl.float32)
        shift = dmin * mn.to(tl.float32)
        b = _byte(base + 16 + (g // 2) * 32 + lane, mask)
        q = tl.where(g % 2 == 0, b & 15, b >> 4)
        v = q.to(tl.float32) * scale - shift
    elif FMT == 3:  # Q6_K: 256 weights in 210 bytes, groups of 16
        base = row0 + (grp // 16) * 210
        g = grp % 16
        half = g // 8
        a = (g // 2) % 4  # quarter (32 weights) within the half
        qlane = (g % 2) * 16 + lane  # lane within the quarter
        ql = _byte(base + 64 * half + 32 * (a % 2) + qlane, mask)
        qh = _byte(base + 128 + 32 * half + qlane, mask)
        q = ((ql >> (4 * (a // 2))) & 15) | (((qh >> (2 * a)) & 3) << 4)
        sc = tl.load(base + 192 + g, mask=ms, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        d = _f16(_byte(base + 208, ms), _byte(base + 209, ms))
        v = (d * sc) * (q.to(tl.float32) - 32.0)
    else:  # NF4: 64 weights, fp32 absmax + 32 code bytes
        base = row0 + grp * 36
        bits = (
            _byte(base, ms)
            | (_byte(base + 1, ms) << 8)
            | (_byte(base + 2, ms) << 16)
            | (_byte(base + 3, ms) << 24)
        )
        absmax = bits.to(tl.float32, bitcast=True)
        b = _byte(base + 4 + lane // 2, mask)
        q = tl.where(lane % 2 == 0, b >> 4, b & 15)  # first weight in the high nibble
        v = tl.load(code_ptr + q, mask=mask, other=0.0) * absmax
    return tl.reshape(v, (R, C))


@triton.jit
def _dequant_kernel(
    q_ptr, out_ptr, code_ptr, n_rows, n_cols, row_bytes, FMT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    r0 = tl.program_id(0) * BR
    c0 = tl.program_id(1) * BC
    v = dequant_tile(q_ptr, row_bytes, n_rows, n_cols, r0, c0, code_ptr, FMT, BR, BC)
    rows = r0 + tl.arange(0, BR)[:, None]
    cols = c0 + tl.arange(0, BC)[None, :]
    tl.store(
        out_ptr + rows.to(tl.int64) * n_cols + cols,
        cast_rne(v, out_ptr.dtype.element_ty),
        mask=(rows < n_rows) & (cols < n_cols),
    )


def dequantize(
    fmt,
    q: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed bytes `q` (``fmt.packed_shape(shape)``) → the weight as `dtype` ``shape``.

    Equal bit for bit to ``fmt.dequantize(q, shape).to(dtype)``. `out`: a contiguous tensor of
    `dtype` with at least ``prod(shape)`` elements to write into (its first ``prod(shape)``
    elements, returned viewed as `shape`), so a caller can keep one buffer for many weights.
    """
    shape = tuple(int(s) for s in shape)
    if not supported(fmt):
        raise ValueError(f"no Triton kernel for {fmt.name}")
    if tuple(q.shape) != fmt.packed_shape(shape):
        raise ValueError(
            f"{fmt.name}: packed shape {tuple(q.shape)} does not match "
            f"{fmt.packed_shape(shape)} for a tensor of shape {shape}"
        )
    if dtype not in OUT_DTYPES:
        raise ValueError(f"unsupported output dtype {dtype}")
    n = math.prod(shape)
    if out is None:
        out = torch.empty(n, dtype=dtype, device=q.device)
    elif out.dtype != dtype or not out.is_contiguous() or out.numel() < n or out.device != q.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of at least {n} elements on {q.device}")
    out = out.reshape(-1)[:n]
    C = shape[-1]
    R = n // C if C else 0
    if n:
        q = q.contiguous()
        BR, BC = (8, 256) if q.is_cuda else (128, 256)  # interpreter (CPU tests): fewer programs
        grid = (triton.cdiv(R, BR), triton.cdiv(C, BC))
        _dequant_kernel[grid](
            q,
            out,
            code_table(q.device),
            R,
            C,
            C // fmt.block_size * fmt.type_size,
            FMT=FORMAT_IDS[fmt.name],
            BR=BR,
            BC=BC,
            **launch_options(),
        )
    return out.view(shape)
