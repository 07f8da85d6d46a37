"""A slow, literal numpy port of ggml's reference K-quant quantisers, for comparison in tests.

Ported from ggml/src/ggml-quants.c (`quantize_row_q4_K_ref` with `make_qkx2_quants`,
`quantize_row_q6_K_ref` with `make_qx_quants`): one group at a time, float32 throughout,
sums accumulated left to right (`np.cumsum`), `nearest_int` = round half to even. It returns
GGUF block bytes, so `gguf.quants.dequantize` reads them.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32


def _sum(a: np.ndarray) -> np.float32:
    """Sequential float32 sum, as a C loop `s += a[i]` computes it."""
    return np.cumsum(a.astype(f32), dtype=f32)[-1]


def _nearest_int(v) -> np.ndarray:
    return np.rint(np.asarray(v, dtype=f32)).astype(np.int32)


def _f16(v) -> np.float32:
    return f32(np.float16(v))


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    mn, mx = f32(x.min()), f32(x.max())
    sum_w, sum_x = _sum(w), _sum(w * x)
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        return f32(0), f32(-mn), np.zeros(x.shape, np.int32)
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
    diff = scale * L.astype(f32) + mn - x
    best = _sum(w * (diff * diff))
    for i in range(nstep + 1):
        iscale = f32(f32(f32(rmin) + f32(rdelta) * f32(i)) + f32(nmax)) / f32(mx - mn)
        laux = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        lf = laux.astype(f32)
        wl = w * lf
        s_l, s_l2, s_xl = _sum(wl), _sum(wl * lf), _sum(wl * x)
        D = f32(sum_w * s_l2 - s_l * s_l)
        if D > 0:
            this_scale = f32(f32(sum_w * s_xl - sum_x * s_l) / D)
            this_min = f32(f32(s_l2 * sum_x - s_l * s_xl) / D)
            if this_min > 0:
                this_min = f32(0)
                this_scale = f32(s_xl / s_l2)
            diff = this_scale * lf + this_min - x
            cur = _sum(w * (diff * diff))
            if cur < best:
                L, best, scale, mn = laux, cur, this_scale, this_min
    return scale, f32(-mn), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [n·256] → uint8 [n, 144]."""
    x = np.asarray(x, f32).reshape(-1, 256)
    out = np.zeros((x.shape[0], 144), np.uint8)
    for b, xb in enumerate(x):
        g = xb.reshape(8, 32)
        scales, mins, L = np.zeros(8, f32), np.zeros(8, f32), np.zeros((8, 32), np.int32)
        for j in range(8):
            av_x = np.sqrt(_sum(g[j] * g[j]) / f32(32))
            scales[j], mins[j], L[j] = make_qkx2_quants(g[j], av_x + np.abs(g[j]), 15, -1.0, 0.1, 20)
        max_scale, max_min = max(f32(0), scales.max()), max(f32(0), mins.max())
        inv_s = f32(63) / max_scale if max_scale > 0 else f32(0)
        inv_m = f32(63) / max_min if max_min > 0 else f32(0)
        ls = np.minimum(63, _nearest_int(inv_s * scales) % 256)
        lm = np.minimum(63, _nearest_int(inv_m * mins) % 256)
        sc = np.zeros(12, np.int32)
        sc[0:4], sc[4:8] = ls[:4] | ((ls[4:] >> 4) << 6), lm[:4] | ((lm[4:] >> 4) << 6)
        sc[8:12] = (ls[4:] & 15) | ((lm[4:] & 15) << 4)
        d, dmin = np.float16(max_scale / f32(63)), np.float16(max_min / f32(63))
        for j in range(8):
            dj = f32(d) * f32(ls[j])
            if dj == 0:
                continue
            dm = f32(dmin) * f32(lm[j])
            L[j] = np.clip(_nearest_int((g[j] + dm) / dj), 0, 15)
        Lf = L.reshape(4, 2, 32)
        qs = (Lf[:, 0] | (Lf[:, 1] << 4)).reshape(128)
        out[b] = np.concatenate(
            [np.frombuffer(d.tobytes() + dmin.tobytes(), np.uint8), sc.astype(np.uint8), qs.astype(np.uint8)]
        )
    return out


def make_qx_quants_rmse1(x, nmax):
    amax_i = int(np.argmax(np.abs(x)))
    mx = f32(x[amax_i])
    if abs(mx) < 1e-15:
        return f32(0), np.zeros(x.shape, np.int32)
    w = x * x
    iscale = f32(f32(-nmax) / mx)
    levels = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
    lf = levels.astype(f32)
    sumlx, suml2 = _sum(w * x * lf), _sum(w * lf * lf)
    scale = f32(sumlx / suml2) if suml2 else f32(0)
    best = f32(scale * sumlx)
    L = levels + nmax
    for i in range(-9, 10):
        if i == 0:
            continue
        iscale = f32(-f32(f32(nmax) + f32(0.1) * f32(i)) / mx)
        levels = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = levels.astype(f32)
        sumlx, suml2 = _sum(w * x * lf), _sum(w * lf * lf)
        if suml2 > 0 and f32(sumlx * sumlx) > f32(best * suml2):
            L = levels + nmax
            scale = f32(sumlx / suml2)
            best = f32(scale * sumlx)
    return scale, L


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [n·256] → uint8 [n, 210]."""
    x = np.asarray(x, f32).reshape(-1, 256)
    out = np.zeros((x.shape[0], 210), np.uint8)
    for b, xb in enumerate(x):
        g = xb.reshape(16, 16)
        scales, L = np.zeros(16, f32), np.zeros((16, 16), np.int32)
        for j in range(16):
            scales[j], L[j] = make_qx_quants_rmse1(g[j], 32)
        i = int(np.argmax(np.abs(scales)))
        if abs(scales[i]) < 1e-15:
            continue
        iscale = f32(f32(-128) / scales[i])
        d = np.float16(f32(1) / iscale)
        sc = np.minimum(127, _nearest_int(iscale * scales))
        for j in range(16):
            dj = f32(d) * f32(sc[j])
            if dj == 0:
                continue
            L[j] = np.clip(_nearest_int(g[j] / dj), -32, 31) + 32
        Lq = L.reshape(2, 4, 32)
        ql = np.concatenate(
            [(Lq[:, 0] & 15) | ((Lq[:, 2] & 15) << 4), (Lq[:, 1] & 15) | ((Lq[:, 3] & 15) << 4)], axis=1
        ).reshape(128)
        qh = (
            (Lq[:, 0] >> 4) | ((Lq[:, 1] >> 4) << 2) | ((Lq[:, 2] >> 4) << 4) | ((Lq[:, 3] >> 4) << 6)
        ).reshape(64)
        out[b] = np.concatenate(
            [
                ql.astype(np.uint8),
                qh.astype(np.uint8),
                sc.astype(np.int8).view(np.uint8),
                np.frombuffer(d.tobytes(), np.uint8),
            ]
        )
    return out
