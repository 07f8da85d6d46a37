"""GGUF's Q4_K: 256-weight super-blocks of eight 32-weight groups, 4.5 bits per weight.

Block layout (144 bytes), as ggml's `block_q4_K`::

    d     f16      super-scale of the group scales
    dmin  f16      super-scale of the group mins
    scales[12]     eight 6-bit scales `sc` and eight 6-bit mins `m`, packed (see `_pack_scales`)
    qs[128]        4-bit quants; byte c·32+l holds weight 64c+l (low nibble) and 64c+32+l (high)

Dequantised weight of group j: ``x̂ = d·sc_j·q − dmin·m_j`` with q ∈ [0, 15].

Quantisation follows ggml's `quantize_row_q4_K_ref` (the path `llama-quantize` takes without an
importance matrix): per group, `make_qkx2_quants` fits ``x ≈ s·l + min`` (min ≤ 0) by weighted
least squares over 21 candidate grids, weights ``w = sqrt(mean(x²)) + |x|``; the eight scales
and mins are quantised to 6 bits against the block maxima; then every weight is re-rounded
against the stored (f16 × 6-bit) scale and min. Here the search runs for all groups at once in
torch (fp32, round-half-even like `nearest_int`). Sums are reduced in torch's order, not C's
sequential order, so a rare group whose candidate errors tie to the last bit may pick the other
candidate; its error is then equal to within fp32 rounding (see `make_qkx2_quants`).

On CPU, `BlockFormat.quantize` runs `kernels.c`'s mirror of `_quantize_chunk` instead (the same
bytes: torch's summation order and torch's own sqrt are kept); this torch code is the reference
it is tested against and the path on other devices.
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
    uint8_wrap,
)

QK_K = 256


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised `make_qkx2_quants` (use_mad = false) over groups.

    Args:
        x: weights ``[G, n]`` (fp32). w: per-weight importance ``[G, n]``.
        nmax: largest quant (15 for 4 bits). rmin, rdelta, nstep: the candidate grids are
            ``iscale = (rmin + rdelta·i + nmax) / (max − min)`` for i = 0..nstep.
    Returns:
        scale ``[G]``, the_min ``[G]`` (= −min ≥ 0) and quants ``L`` ``[G, n]`` (float, 0..nmax),
        such that ``x ≈ scale·L − the_min``.

    The candidate fit (scale, min) is computed from fp32 sums as in C. Its weighted squared
    error ``Σ w (s·l + m − x)²`` is expanded into those same sums (``s²Σwl² + 2smΣwl − 2sΣwlx +
    m²Σw − 2mΣwx + Σwx²``) and combined in fp64 (fp32 on MPS, which lacks fp64), which saves a pass over the
    weights per candidate; it agrees with C's direct sum to ~1e-6 relative, so only candidates whose
    errors tie to that precision can be ranked differently.
    """
    mn = x.amin(dim=1, keepdim=True).clamp(max=0)  # min is never above 0
    mx = x.amax(dim=1, keepdim=True)
    flat = mx == mn
    one = torch.ones_like(mx)
    wx = w * x
    sum_w = w.sum(dim=1, keepdim=True)
    sum_x = wx.sum(dim=1, keepdim=True)
    acc = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    sw, sx, sxx = sum_w.to(acc), sum_x.to(acc), (wx * x).sum(dim=1, keepdim=True).to(acc)

    def sums(iscale: torch.Tensor, xm: torch.Tensor):
        levels = torch.round(xm * iscale).clamp_(0, nmax)  # nearest_int(iscale*(x - min))
        wl = w * levels
        return (
            wl.sum(dim=1, keepdim=True),
            (wl * levels).sum(dim=1, keepdim=True),
            (wl * x).sum(dim=1, keepdim=True),
        )

    def error(s, m, s_l, s_l2, s_xl):
        s, m = s.to(acc), m.to(acc)
        return (
            s * s * s_l2.to(acc)
            + 2 * s * m * s_l.to(acc)
            - 2 * s * s_xl.to(acc)
            + m * m * sw
            - 2 * m * sx
            + sxx
        )

    # As in C, `min` is updated with each better candidate, and later grids are laid
    # between the new min and max: the search walks, it does not scan a fixed grid.
    best_min = mn
    best_xm = x - mn
    best_iscale = nmax / torch.where(flat, one, mx - mn)
    scale = 1 / best_iscale
    best = error(scale, mn, *sums(best_iscale, best_xm))
    for i in range(nstep + 1):
        c = float(np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax))
        rng = mx - best_min
        iscale = c / torch.where(rng == 0, one, rng)
        xm = x - best_min
        s_l, s_l2, s_xl = sums(iscale, xm)
        D = sum_w * s_l2 - s_l * s_l
        ok = (D > 0) & ~flat
        D = torch.where(ok, D, one)
        this_scale = (sum_w * s_xl - sum_x * s_l) / D
        this_min = (s_l2 * sum_x - s_l * s_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, s_xl / torch.where(pos, s_l2, one), this_scale)
        cur = error(this_scale, this_min, s_l, s_l2, s_xl)
        better = ok & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_xm = torch.where(better, xm, best_xm)
        best_min = torch.where(better, this_min, best_min)
    L = torch.round(best_xm * best_iscale).clamp_(0, nmax)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    best_min = torch.where(flat, mn, best_min)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale[:, 0], -best_min[:, 0], L


def _pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins ``[n, 8]`` (uint8) → the 12 scale bytes ``[n, 12]``.

    bytes 0–3: sc0–3 | (sc4–7 >> 4) << 6;  bytes 4–7: m0–3 | (m4–7 >> 4) << 6;
    bytes 8–11: (sc4–7 & 15) | (m4–7 & 15) << 4.
    """
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return torch.cat(
        [lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], dim=1
    )


def unpack_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes ``[n, 12]`` → 6-bit scales and mins, each uint8 ``[n, 8]``."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


# Dequantisation in plain torch, in two steps: the per-group scales (1/32 of the data) and the
# nibble expansion. `kernels.c` computes the same values in one pass on CPU.


def dequant_prep(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[n, 144]`` → group scales ``d·sc`` and shifts ``dmin·m``, each fp32 ``[n, 4, 2]``
    (pair c, nibble h: group 2c+h)."""
    n = blocks.shape[0]
    b = blocks[:, :16].to(torch.int32)
    dd = f16_from_bytes(b[:, 0:4:2], b[:, 1:4:2])  # [n, 2]: d, dmin
    lo, mid, hi = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], dim=1).to(torch.float32)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], dim=1).to(torch.float32)
    return (dd[:, 0:1] * sc).reshape(n, 4, 2), (dd[:, 1:2] * mn).reshape(n, 4, 2)


def dequant_expand(blocks: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 144]`` + `dequant_prep`'s scales → fp32 ``[n, 256]``: ``scale·q − shift``."""
    n = blocks.shape[0]
    qs = blocks[:, 16:].reshape(n, 4, 32).to(torch.int32)  # int32: vector shifts exist in AVX2
    lo = (qs & 15).to(torch.float32) * scale[:, :, 0:1] - shift[:, :, 0:1]
    hi = (qs >> 4).to(torch.float32) * scale[:, :, 1:2] - shift[:, :, 1:2]
    return torch.stack([lo, hi], dim=2).reshape(n, QK_K)


class Q4_K(BlockFormat):
    name, block_size, type_size = "q4_k", QK_K, 144
    ggml_type = GGMLQuantizationType.Q4_K

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        out = torch.empty(blocks.shape[0], self.type_size, dtype=torch.uint8, device=blocks.device)
        return map_chunks(self._quantize_chunk, blocks, out, chunk_elements(blocks.device) // QK_K)

    def _quantize_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        g = x.reshape(n * 8, 32)
        av_x = torch.sqrt((g * g).sum(dim=1, keepdim=True) / 32)
        scales, mins, L = make_qkx2_quants(g, av_x + g.abs(), nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

        max_scale = scales.amax(dim=1, keepdim=True).clamp(min=0)  # [n, 1]
        max_min = mins.amax(dim=1, keepdim=True).clamp(min=0)
        zero = torch.zeros_like(max_scale)
        inv_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1 + zero), zero)
        inv_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1 + zero), zero)
        ls = uint8_wrap(nearest_int(inv_scale * scales)).clamp(max=63)
        lm = uint8_wrap(nearest_int(inv_min * mins)).clamp(max=63)
        d, dmin = max_scale / 63, max_min / 63

        # Re-round every weight against the stored scales (f16 super-scale × 6-bit group scale).
        dq = (f16_round(d) * ls).reshape(n * 8, 1)
        dm = (f16_round(dmin) * lm).reshape(n * 8, 1)
        has = dq != 0
        req = nearest_int((g + dm) / torch.where(has, dq, torch.ones_like(dq))).clamp(0, 15)
        L = torch.where(has, req, L).to(torch.uint8).reshape(n, 4, 2, 32)
        qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(n, 128)
        return torch.cat(
            [f16_bytes(d), f16_bytes(dmin), _pack_scales(ls.to(torch.uint8), lm.to(torch.uint8)), qs], dim=1
        )

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return dequant_expand(blocks, *dequant_prep(blocks))
