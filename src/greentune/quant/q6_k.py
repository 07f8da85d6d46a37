"""GGUF's Q6_K: 256-weight super-blocks of sixteen 16-weight groups, 6.5625 bits per weight.

Block layout (210 bytes), as ggml's `block_q6_K`::

    ql[128]     low 4 bits of the quants
    qh[64]      high 2 bits of the quants
    scales[16]  int8 group scales
    d     f16   super-scale

Dequantised weight of group j: ``x̂ = d·scale_j·(q − 32)`` with q ∈ [0, 63]. Within each half
of 128 weights, quarter a (32 weights, a = 0..3) and lane l: ``ql[64h + l]`` holds quarters 0
(low nibble) and 2 (high), ``ql[64h + 32 + l]`` quarters 1 and 3, ``qh[32h + l]`` the high bits
of quarters 0..3 at bit 2a.

Quantisation follows ggml's `quantize_row_q6_K_ref`: per group `make_qx_quants(16, 32, x, L,
rmse_type=1)` (weights x², 19 candidate grids ``iscale = −(32 + 0.1·i)/max``, i = −9..9, the best
by ``(Σwxl)²/Σwl²``), the group scales quantised to int8 against the largest, then each weight
re-rounded against its stored scale. It is the type the Q4_K_M mix uses for some tensors.
On CPU, `BlockFormat.quantize` runs `kernels.c`'s mirror of `_quantize_chunk` (the same bytes).
"""

from __future__ import annotations

import numpy as np
import torch

from greentune.quant.block import (
    BlockFormat,
    GGMLQuantizationType,
    chunk_elements,
    f16_bytes,
    f16_from_bytes,
    f16_round,
    map_chunks,
    nearest_int,
)

QK_K = 256
GROUP_MAX_EPS = 1e-15


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised `make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)` over groups ``x [G, n]``.

    Returns the scale ``[G]`` (signed; x ≈ scale·(L − nmax)) and the quants ``L [G, n]`` as
    float in [0, 2·nmax − 1]. All-zero groups (max |x| < 1e-15) get scale 0 and L = 0.
    """
    ax = x.abs()
    imax = ax.argmax(dim=1, keepdim=True)  # first of equal maxima, as the C loop
    mx = torch.gather(x, 1, imax)  # signed value of largest magnitude
    zero = ax.amax(dim=1, keepdim=True) < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x

    def sums(iscale):
        levels = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        return (wx * levels).sum(dim=1, keepdim=True), ((w * levels) * levels).sum(dim=1, keepdim=True)

    best_iscale = -nmax / mx
    sumlx, suml2 = sums(best_iscale)
    scale = torch.where(
        suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx)
    )
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        c = float(np.float32(nmax) + np.float32(0.1) * np.float32(i))
        iscale = -c / mx
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(better, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    L = nearest_int(best_iscale * x).clamp(-nmax, nmax - 1) + nmax
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale[:, 0], L


def dequant_prep(blocks: torch.Tensor) -> tuple[torch.Tensor]:
    """uint8 ``[n, 210]`` → group scales ``d·scale_j``, fp32 ``[n, 16, 1]``."""
    n = blocks.shape[0]
    b = blocks[:, 208:210].to(torch.int32)
    d = f16_from_bytes(b[:, 0:1], b[:, 1:2])
    sc = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    return ((d * sc).reshape(n, 16, 1),)


def dequant_expand(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 210]`` + `dequant_prep`'s scales → fp32 ``[n, 256]``: ``scale·(q − 32)``."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64).to(torch.int32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32).to(torch.int32)
    lo = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)  # quarters 0,1,2,3
    hi = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2)  # [n, 2, 4, 32]
    q = (lo | (hi << 4)).to(torch.float32) - 32
    return (scale * q.reshape(n, 16, 16)).reshape(n, QK_K)


class Q6_K(BlockFormat):
    name, block_size, type_size = "q6_k", QK_K, 210
    ggml_type = GGMLQuantizationType.Q6_K

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        out = torch.empty(blocks.shape[0], self.type_size, dtype=torch.uint8, device=blocks.device)
        return map_chunks(self._quantize_chunk, blocks, out, chunk_elements(blocks.device) // QK_K)

    def _quantize_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        g = x.reshape(n * 16, 16)
        scales, L = make_qx_quants_rmse1(g, nmax=32)
        scales = scales.reshape(n, 16)
        imax = scales.abs().argmax(dim=1, keepdim=True)
        max_scale = torch.gather(scales, 1, imax)  # [n, 1], signed
        empty = max_scale.abs() < GROUP_MAX_EPS
        max_scale = torch.where(empty, torch.ones_like(max_scale), max_scale)
        iscale = -128 / max_scale
        d = 1 / iscale
        sc = nearest_int(iscale * scales).clamp(max=127)  # [n, 16] in [-128, 127]

        dj = (f16_round(d) * sc).reshape(n * 16, 1)
        has = dj != 0
        req = nearest_int(g / torch.where(has, dj, torch.ones_like(dj))).clamp(-32, 31) + 32
        L = torch.where(has, req, L).to(torch.uint8).reshape(n, 2, 4, 32)
        ql = torch.cat(
            [L[:, :, 0] & 0x0F | ((L[:, :, 2] & 0x0F) << 4), L[:, :, 1] & 0x0F | ((L[:, :, 3] & 0x0F) << 4)],
            dim=2,
        ).reshape(n, 128)
        qh = (
            (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        ).reshape(n, 64)
        out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1)
        return torch.where(empty, torch.zeros_like(out), out)  # all-zero block: memset 0

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return dequant_expand(blocks, *dequant_prep(blocks))
