/* greentune.quant native kernels: packed GGUF blocks <-> float32, one block after another.
 *
 * Built on first use by `kernels.py` with the system C compiler (cc -O3 -march=native
 * -ffp-contract=off -fno-trapping-math) and called through ctypes. Each dequantise function
 * computes exactly what the format's plain-torch `_dequantize_blocks` computes, and each
 * quantise function exactly what its `_quantize_blocks` computes, in the same order of fp32 operations (no fused
 * multiply-add: -ffp-contract=off), so values and bytes are bit-identical; tests check it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    float f;
    if (e == 0) {
        f = (float)m * (1.0f / 16777216.0f);           /* zero or subnormal: m * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= s;
    } else if (e == 31) {
        bits = s | 0x7f800000u | (m << 13);
    } else {
        bits = s | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

void gt_dequant_q8_0(const uint8_t *restrict q, float *restrict out, int64_t n) {
    for (int64_t b = 0; b < n; b++, q += 34, out += 32) {
        const float d = h2f(rd16(q));
        const int8_t *v = (const int8_t *)(q + 2);
        for (int l = 0; l < 32; l++) out[l] = (float)v[l] * d;
    }
}

void gt_dequant_q4_0(const uint8_t *restrict q, float *restrict out, int64_t n) {
    for (int64_t b = 0; b < n; b++, q += 18, out += 32) {
        const float d = h2f(rd16(q));
        const uint8_t *qs = q + 2;
        for (int l = 0; l < 16; l++) {
            out[l] = ((float)(qs[l] & 15) - 8.0f) * d;
            out[16 + l] = ((float)(qs[l] >> 4) - 8.0f) * d;
        }
    }
}

void gt_dequant_q4_k(const uint8_t *restrict q, float *restrict out, int64_t n) {
    for (int64_t b = 0; b < n; b++, q += 144, out += 256) {
        const float d = h2f(rd16(q)), dmin = h2f(rd16(q + 2));
        const uint8_t *s = q + 4, *qs = q + 16;
        float sc[8], mn[8];
        for (int j = 0; j < 4; j++) {
            sc[j] = d * (float)(s[j] & 63);
            mn[j] = dmin * (float)(s[j + 4] & 63);
            sc[j + 4] = d * (float)((s[j + 8] & 15) | ((s[j] >> 6) << 4));
            mn[j + 4] = dmin * (float)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
        }
        for (int c = 0; c < 4; c++) {
            const float a0 = sc[2 * c], m0 = mn[2 * c], a1 = sc[2 * c + 1], m1 = mn[2 * c + 1];
            const uint8_t *p = qs + 32 * c;
            float *o = out + 64 * c;
            for (int l = 0; l < 32; l++) {
                o[l] = (float)(p[l] & 15) * a0 - m0;
                o[32 + l] = (float)(p[l] >> 4) * a1 - m1;
            }
        }
    }
}

void gt_dequant_q6_k(const uint8_t *restrict q, float *restrict out, int64_t n) {
    for (int64_t b = 0; b < n; b++, q += 210, out += 256) {
        const float d = h2f(rd16(q + 208));
        const int8_t *sc = (const int8_t *)(q + 192);
        float scale[16];
        for (int g = 0; g < 16; g++) scale[g] = d * (float)sc[g];
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = q + 64 * h, *qh = q + 128 + 32 * h;
            float *o = out + 128 * h;
            const float *s = scale + 8 * h;
            for (int l = 0; l < 32; l++) {
                const int q0 = (ql[l] & 15) | (((qh[l] >> 0) & 3) << 4);
                const int q1 = (ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4);
                const int q2 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                const int q3 = (ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4);
                const int g = l >> 4;
                o[l] = s[g] * ((float)q0 - 32.0f);
                o[32 + l] = s[2 + g] * ((float)q1 - 32.0f);
                o[64 + l] = s[4 + g] * ((float)q2 - 32.0f);
                o[96 + l] = s[6 + g] * ((float)q3 - 32.0f);
            }
        }
    }
}

/* NF4 (nf4.py): fp32 absmax + 32 bytes of two 4-bit codes, high nibble first; x = code[q] * absmax.
   The table is nf4.NF4_CODE, each Python double rounded to float as torch.tensor(dtype=float32) does. */
static const float NF4_CODE[16] = {
    (float)-1.0, (float)-0.6961928009986877, (float)-0.5250730514526367, (float)-0.39491748809814453,
    (float)-0.28444138169288635, (float)-0.18477343022823334, (float)-0.09105003625154495, (float)0.0,
    (float)0.07958029955625534, (float)0.16093020141124725, (float)0.24611230194568634, (float)0.33791524171829224,
    (float)0.44070982933044434, (float)0.5626170039176941, (float)0.7229568362236023, (float)1.0
};

void gt_dequant_nf4(const uint8_t *restrict q, float *restrict out, int64_t n) {
    for (int64_t b = 0; b < n; b++, q += 36, out += 64) {
        float d;
        memcpy(&d, q, 4);
        const uint8_t *c = q + 4;
        float hi[32], lo[32];
        for (int l = 0; l < 32; l++) {
            hi[l] = NF4_CODE[c[l] >> 4];
            lo[l] = NF4_CODE[c[l] & 15];
        }
        for (int l = 0; l < 32; l++) {
            out[2 * l] = hi[l] * d;
            out[2 * l + 1] = lo[l] * d;
        }
    }
}

/* ==== quantise ================================================================================
 *
 * Mirrors of the plain-torch `_quantize_blocks`, operation for operation. What makes that exact:
 *
 * - Sums are reduced in torch's order, not left to right. torch's CPU `sum(dim=1)` over a
 *   contiguous row of n floats (SumKernel.cpp, `vectorized_inner_sum`) splits it into vectors of
 *   W lanes, adds the vectors lane-wise (four ILP accumulators once there are >= 4 vectors),
 *   then the lanes left to right. W is what torch's build uses (8 on x86); `kernels.py` finds it
 *   by comparing `gt_probe_reductions` with torch on a probe and passes it as `lanes`.
 * - `amax`/`amin` (Reduce.h, `vectorized_inner_reduction`) pick which of two equal values
 *   (+0 and -0) survives in torch's order too: it decides the sign bit of a zero f16 scale.
 * - `c / t` for a Python number c is `t.reciprocal() * c` in torch (Tensor.__rtruediv__): two
 *   roundings, kept here as `rcp(t) * c`.
 * - clamp is torch's `min(hi, max(lo, x))` with x86 max/min semantics; round is half to even.
 * - torch.sqrt is MKL's vsSqrt, which is not correctly rounded: Q4_K's sqrt(mean x^2) per group
 *   is computed by torch between `gt_q4_k_mean_square` and `gt_quant_q4_k`.
 *
 * Groups are processed structure-of-arrays, a[element][group], so every loop runs over the
 * groups of one block (8 for Q4_K, 16 for Q6_K) and vectorises. */

#define AI static inline __attribute__((always_inline))

static inline uint16_t f2h(float f) {   /* fp32 -> IEEE half, round to nearest even (as c10) */
    uint32_t w, bias, bits;
    memcpy(&w, &f, 4);
    const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f, bf;
    bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    bias = (bias >> 1) + 0x07800000u;
    memcpy(&bf, &bias, 4);
    base = bf + base;
    memcpy(&bits, &base, 4);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
AI float f16r(float x) { return h2f(f2h(x)); }                        /* block.f16_round */
AI float rcp(float x) { return 1.0f / x; }                             /* torch reciprocal */
AI float clampmin(float a, float lo) { return lo > a ? lo : a; }       /* _mm_max_ps(lo, a) */
AI float clampmax(float a, float hi) { return hi < a ? hi : a; }       /* _mm_min_ps(hi, a) */
AI float clamp(float a, float lo, float hi) { return clampmax(clampmin(a, lo), hi); }
AI float wrap256(float x) {                                            /* torch.remainder(x, 256) */
    float m = fmodf(x, 256.0f);
    return (m != 0.0f && m < 0.0f) ? m + 256.0f : m;
}

/* out[g] = torch's fp32 sum over e of a[e*G + g], for rows of n elements and W vector lanes. */
AI void tsum(const float *restrict a, const int n, const int G, const int W, float *restrict out) {
    const int nv = n / W, ilp = nv / 4;
    for (int g = 0; g < G; g++) out[g] = 0.0f;
    for (int e = nv * W; e < n; e++)
        for (int g = 0; g < G; g++) out[g] += a[e * G + g];
    for (int j = 0; j < W; j++) {
        float p0[G], p1[G], p2[G], p3[G];
        for (int g = 0; g < G; g++) p0[g] = p1[g] = p2[g] = p3[g] = 0.0f;
        if (ilp) {
            for (int r = 0; r < ilp; r++)
                for (int g = 0; g < G; g++) {
                    p0[g] += a[((4 * r + 0) * W + j) * G + g];
                    p1[g] += a[((4 * r + 1) * W + j) * G + g];
                    p2[g] += a[((4 * r + 2) * W + j) * G + g];
                    p3[g] += a[((4 * r + 3) * W + j) * G + g];
                }
            for (int t = 4 * ilp; t < nv; t++)
                for (int g = 0; g < G; g++) p0[g] += a[(t * W + j) * G + g];
            for (int g = 0; g < G; g++) p0[g] = ((p0[g] + p1[g]) + p2[g]) + p3[g];
        } else {
            for (int t = 0; t < nv; t++)
                for (int g = 0; g < G; g++) p0[g] += a[(t * W + j) * G + g];
        }
        for (int g = 0; g < G; g++) out[g] += p0[g];
    }
}

/* out[g] = torch's amax (is_max) or amin over e of a[e*G + g]: which of equal values survives
   follows torch (vector op keeps its second operand on ties, the scalar op its first). */
AI void tminmax(const float *restrict a, const int n, const int G, const int W, const int is_max,
                float *restrict out) {
#define BETTER(u, v) (is_max ? (u) > (v) : (u) < (v))
    const int stride = 4 * W, count = n / stride;
    int e0 = 0;
    for (int g = 0; g < G; g++) out[g] = is_max ? -INFINITY : INFINITY;
    if (count > 0) {
        for (int j = 0; j < W; j++) {
            float acc[4][G];
            for (int k = 0; k < 4; k++)
                for (int g = 0; g < G; g++) acc[k][g] = a[(k * W + j) * G + g];
            for (int i = 1; i < count; i++)
                for (int k = 0; k < 4; k++)
                    for (int g = 0; g < G; g++) {
                        const float v = a[(i * stride + k * W + j) * G + g];
                        acc[k][g] = BETTER(acc[k][g], v) ? acc[k][g] : v;
                    }
            for (int g = 0; g < G; g++) {
                const float u = BETTER(acc[0][g], acc[1][g]) ? acc[0][g] : acc[1][g];
                const float v = BETTER(acc[2][g], acc[3][g]) ? acc[2][g] : acc[3][g];
                const float lane = BETTER(u, v) ? u : v;
                /* buffer[0] = op(buffer[0], buffer[j]): the first keeps ties */
                out[g] = (j == 0) ? lane : (BETTER(lane, out[g]) ? lane : out[g]);
            }
        }
        e0 = count * stride;
    }
    for (int e = e0; e < n; e++)
        for (int g = 0; g < G; g++) {
            const float v = a[e * G + g];
            out[g] = BETTER(v, out[g]) ? v : out[g];
        }
#undef BETTER
}

/* For kernels.py's check that tsum/tminmax reduce in the order this torch does: a is [n][G]. */
void gt_probe_reductions(const float *a, int64_t n, int64_t G, int64_t W, float *sum, float *mx,
                         float *mn) {
    tsum(a, (int)n, (int)G, (int)W, sum);
    tminmax(a, (int)n, (int)G, (int)W, 1, mx);
    tminmax(a, (int)n, (int)G, (int)W, 0, mn);
}

/* ---- Q8_0, Q4_0 (simple.py) ---- */

void gt_quant_q8_0(const float *restrict x, uint8_t *restrict q, int64_t n) {
    for (int64_t b = 0; b < n; b++, x += 32, q += 34) {
        float amax = -INFINITY;
        for (int l = 0; l < 32; l++) { const float a = fabsf(x[l]); amax = a > amax ? a : amax; }
        const float d = amax / 127.0f, id = d == 0.0f ? 0.0f : rcp(d);
        wr16(q, f2h(d));
        for (int l = 0; l < 32; l++) {                /* _round_half_away: gguf-py's np_roundf */
            const float v = x[l] * id, a = fabsf(v), fl = floorf(a);
            const float r = (float)((v > 0.0f) - (v < 0.0f)) * (fl + floorf(2.0f * (a - fl)));
            q[2 + l] = (uint8_t)(int8_t)r;
        }
    }
}

void gt_quant_q4_0(const float *restrict x, uint8_t *restrict q, int64_t n) {
    for (int64_t b = 0; b < n; b++, x += 32, q += 18) {
        int imax = 0;
        float amax = fabsf(x[0]);
        for (int l = 1; l < 32; l++) if (fabsf(x[l]) > amax) { amax = fabsf(x[l]); imax = l; }
        const float d = x[imax] / -8.0f, id = d == 0.0f ? 0.0f : rcp(d);
        wr16(q, f2h(d));
        uint8_t v[32];
        for (int l = 0; l < 32; l++) v[l] = (uint8_t)clamp(truncf(x[l] * id + 8.5f), 0.0f, 15.0f);
        for (int l = 0; l < 16; l++) q[2 + l] = (uint8_t)(v[l] | (v[16 + l] << 4));
    }
}

/* ---- Q4_K (q4_k.py: `make_qkx2_quants` and `_quantize_chunk`) ---- */

AI double qkx2_error(float s_, float m_, float s_l, float s_l2, float s_xl, double sw, double sx,
                     double sxx) {
    const double s = s_, m = m_;
    return (((((s * s) * (double)s_l2 + ((2 * s) * m) * (double)s_l) - (2 * s) * (double)s_xl)
             + (m * m) * sw) - (2 * m) * sx) + sxx;
}

/* wl, wl*l and wl*x summed for l = clamp(round((x - base) * iscale), 0, 15). (Materialised, then
   tsum: measured faster here than qx_sums' fused form, which is faster for Q6_K's 16 groups.) */
AI void qkx2_sums(const float *x, const float *w, const float *iscale, const float *base, int W,
                  float *s_l, float *s_l2, float *s_xl) {
    float a[32 * 8], b[32 * 8], c[32 * 8];
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) {
            const int i = e * 8 + g;
            const float l = clamp(rintf((x[i] - base[g]) * iscale[g]), 0.0f, 15.0f);
            const float wl = w[i] * l;
            a[i] = wl; b[i] = wl * l; c[i] = wl * x[i];
        }
    tsum(a, 32, 8, W, s_l);
    tsum(b, 32, 8, W, s_l2);
    tsum(c, 32, 8, W, s_xl);
}

AI void to_groups(const float *restrict xb, float *restrict x) {   /* x[e * 8 + g] = xb[32 g + e] */
    for (int g = 0; g < 8; g++)
        for (int e = 0; e < 32; e++) x[e * 8 + g] = xb[32 * g + e];
}

AI void q4_k_mean_square(const float *restrict xb, float *restrict ms, const int W) {
    float x[256], t[256];
    to_groups(xb, x);
    for (int i = 0; i < 256; i++) t[i] = x[i] * x[i];
    tsum(t, 32, 8, W, ms);
    for (int g = 0; g < 8; g++) ms[g] = ms[g] / 32.0f;
}

/* Step 1 of Q4_K: ms[8 b + g] = sum(x^2) / 32 of group g of block b. Step 2 takes av = sqrt(ms)
   computed by torch: torch.sqrt is MKL's vsSqrt, which is not correctly rounded. */
void gt_q4_k_mean_square(const float *restrict x, float *restrict ms, int64_t n, int64_t lanes) {
    for (int64_t b = 0; b < n; b++, x += 256, ms += 8) {
        if (lanes == 8) q4_k_mean_square(x, ms, 8);
        else if (lanes == 16) q4_k_mean_square(x, ms, 16);
        else q4_k_mean_square(x, ms, 4);
    }
}

AI void q4_k_block(const float *restrict xb, const float *restrict av, uint8_t *restrict q, const int W) {
    float x[256], w[256], t[256];                       /* [element][group] */
    to_groups(xb, x);
    float sum_w[8], sum_x[8], sxx_f[8], mn[8], mx[8];
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) w[e * 8 + g] = av[g] + fabsf(x[e * 8 + g]);

    /* make_qkx2_quants(x, w, nmax=15, rmin=-1, rdelta=0.1, nstep=20) */
    tminmax(x, 32, 8, W, 0, mn);
    tminmax(x, 32, 8, W, 1, mx);
    for (int i = 0; i < 256; i++) t[i] = w[i] * x[i];
    tsum(w, 32, 8, W, sum_w);
    tsum(t, 32, 8, W, sum_x);
    for (int i = 0; i < 256; i++) t[i] = t[i] * x[i];
    tsum(t, 32, 8, W, sxx_f);
    int flat[8];
    double sw[8], sx[8], sxx[8], best[8];
    float best_min[8], base[8], best_iscale[8], scale[8], s_l[8], s_l2[8], s_xl[8];
    for (int g = 0; g < 8; g++) {
        mn[g] = clampmax(mn[g], 0.0f);
        flat[g] = mx[g] == mn[g];
        sw[g] = sum_w[g]; sx[g] = sum_x[g]; sxx[g] = sxx_f[g];
        best_min[g] = base[g] = mn[g];
        best_iscale[g] = rcp(flat[g] ? 1.0f : mx[g] - mn[g]) * 15.0f;
        scale[g] = rcp(best_iscale[g]);
    }
    qkx2_sums(x, w, best_iscale, base, W, s_l, s_l2, s_xl);
    for (int g = 0; g < 8; g++)
        best[g] = qkx2_error(scale[g], mn[g], s_l[g], s_l2[g], s_xl[g], sw[g], sx[g], sxx[g]);
    for (int i = 0; i <= 20; i++) {
        const float c = (-1.0f + 0.1f * (float)i) + 15.0f;
        float iscale[8], xbase[8];
        for (int g = 0; g < 8; g++) {
            const float rng = mx[g] - best_min[g];
            iscale[g] = rcp(rng == 0.0f ? 1.0f : rng) * c;
            xbase[g] = best_min[g];
        }
        qkx2_sums(x, w, iscale, xbase, W, s_l, s_l2, s_xl);
        for (int g = 0; g < 8; g++) {
            float D = sum_w[g] * s_l2[g] - s_l[g] * s_l[g];
            const int ok = (D > 0.0f) & !flat[g];
            D = ok ? D : 1.0f;
            float this_scale = (sum_w[g] * s_xl[g] - sum_x[g] * s_l[g]) / D;
            float this_min = (s_l2[g] * sum_x[g] - s_l[g] * s_xl[g]) / D;
            const int pos = this_min > 0.0f;
            this_min = pos ? 0.0f : this_min;
            this_scale = pos ? s_xl[g] / (pos ? s_l2[g] : 1.0f) : this_scale;
            const double cur = qkx2_error(this_scale, this_min, s_l[g], s_l2[g], s_xl[g], sw[g], sx[g], sxx[g]);
            const int better = ok & (cur < best[g]);           /* (selects, no branch: vectorises) */
            best[g] = better ? cur : best[g];
            scale[g] = better ? this_scale : scale[g];
            best_iscale[g] = better ? iscale[g] : best_iscale[g];
            base[g] = better ? xbase[g] : base[g];
            best_min[g] = better ? this_min : best_min[g];
        }
    }
    float L[256], scales[8], mins[8];
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) {
            const int i = e * 8 + g;
            const float l = clamp(rintf((x[i] - base[g]) * best_iscale[g]), 0.0f, 15.0f);
            L[i] = flat[g] ? 0.0f : l;
        }
    for (int g = 0; g < 8; g++) {
        scales[g] = flat[g] ? 0.0f : scale[g];
        mins[g] = -(flat[g] ? mn[g] : best_min[g]);
    }

    /* _quantize_chunk: 6-bit scales and mins against the block maxima */
    float max_scale = -INFINITY, max_min = -INFINITY;
    for (int g = 0; g < 8; g++) {
        max_scale = scales[g] > max_scale ? scales[g] : max_scale;
        max_min = mins[g] > max_min ? mins[g] : max_min;
    }
    max_scale = clampmin(max_scale, 0.0f);
    max_min = clampmin(max_min, 0.0f);
    const float inv_scale = max_scale > 0.0f ? rcp(max_scale) * 63.0f : 0.0f;
    const float inv_min = max_min > 0.0f ? rcp(max_min) * 63.0f : 0.0f;
    const float d = max_scale / 63.0f, dmin = max_min / 63.0f;
    const float d16 = f16r(d), dmin16 = f16r(dmin);
    uint8_t ls[8], lm[8];
    float dq[8], dm[8];
    for (int g = 0; g < 8; g++) {
        const float fs = clampmax(wrap256(rintf(inv_scale * scales[g])), 63.0f);
        const float fm = clampmax(wrap256(rintf(inv_min * mins[g])), 63.0f);
        ls[g] = (uint8_t)fs; lm[g] = (uint8_t)fm;
        dq[g] = d16 * fs; dm[g] = dmin16 * fm;
    }
    uint8_t Lq[256];                                      /* block order: 32 g + e */
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) {
            const int i = e * 8 + g;
            const int has = dq[g] != 0.0f;
            const float req = clamp(rintf((x[i] + dm[g]) / (has ? dq[g] : 1.0f)), 0.0f, 15.0f);
            Lq[32 * g + e] = (uint8_t)(has ? req : L[i]);
        }
    wr16(q, f2h(d));
    wr16(q + 2, f2h(dmin));
    for (int j = 0; j < 4; j++) {
        q[4 + j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        q[8 + j] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        q[12 + j] = (uint8_t)((ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4));
    }
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++)
            q[16 + 32 * c + l] = (uint8_t)(Lq[64 * c + l] | (Lq[64 * c + 32 + l] << 4));
}

/* The lane count is a parameter of the summation order; each supported value gets its own
   constant-folded copy of the block function. */
void gt_quant_q4_k(const float *restrict x, const float *restrict av, uint8_t *restrict q, int64_t n,
                   int64_t lanes) {
    for (int64_t b = 0; b < n; b++, x += 256, av += 8, q += 144) {
        if (lanes == 8) q4_k_block(x, av, q, 8);
        else if (lanes == 16) q4_k_block(x, av, q, 16);
        else q4_k_block(x, av, q, 4);
    }
}

/* ---- Q6_K (q6_k.py: `make_qx_quants_rmse1` and `_quantize_chunk`) ---- */

/* l*x*x^2 and l^2*x^2 summed (in tsum's order, fused) for l = clamp(round(iscale * x), -32, 31) */
AI void qx_sums(const float *x, const float *w, const float *wx, const float *iscale, const int W,
                float *sumlx, float *suml2) {
    const int nv = 16 / W, ilp = nv / 4;
    for (int g = 0; g < 16; g++) sumlx[g] = suml2[g] = 0.0f;
    for (int j = 0; j < W; j++) {
        float a[4][16] = {{0}}, b[4][16] = {{0}};
#pragma GCC unroll 8
        for (int t = 0; t < nv; t++) {
            const int k = t < 4 * ilp ? t % 4 : 0, e = t * W + j;
            for (int g = 0; g < 16; g++) {
                const int i = e * 16 + g;
                const float l = clamp(rintf(iscale[g] * x[i]), -32.0f, 31.0f);
                a[k][g] += wx[i] * l; b[k][g] += (w[i] * l) * l;
            }
        }
        for (int g = 0; g < 16; g++) {
            sumlx[g] += ((a[0][g] + a[1][g]) + a[2][g]) + a[3][g];
            suml2[g] += ((b[0][g] + b[1][g]) + b[2][g]) + b[3][g];
        }
    }
}

AI void q6_k_block(const float *restrict xb, uint8_t *restrict q, const int W) {
    float x[256], w[256], wx[256];                      /* [element][group] */
    for (int g = 0; g < 16; g++)
        for (int e = 0; e < 16; e++) x[e * 16 + g] = xb[16 * g + e];
    float mx[16], rmx[16], best_iscale[16], scale[16], best[16], sumlx[16], suml2[16];
    int zero[16];
    for (int g = 0; g < 16; g++) {                      /* argmax |x|: the first of equal maxima */
        int imax = 0;
        float amax = fabsf(x[g]);
        for (int e = 1; e < 16; e++)
            if (fabsf(x[e * 16 + g]) > amax) { amax = fabsf(x[e * 16 + g]); imax = e; }
        zero[g] = amax < 1e-15f;
        mx[g] = zero[g] ? 1.0f : x[imax * 16 + g];
        rmx[g] = rcp(mx[g]);
    }
    for (int i = 0; i < 256; i++) { w[i] = x[i] * x[i]; wx[i] = w[i] * x[i]; }
    for (int g = 0; g < 16; g++) best_iscale[g] = rmx[g] * -32.0f;
    qx_sums(x, w, wx, best_iscale, W, sumlx, suml2);
    for (int g = 0; g < 16; g++) {
        scale[g] = suml2[g] != 0.0f ? sumlx[g] / (suml2[g] != 0.0f ? suml2[g] : 1.0f) : 0.0f;
        best[g] = scale[g] * sumlx[g];
    }
    for (int i = -9; i <= 9; i++) {
        if (i == 0) continue;
        const float c = 32.0f + 0.1f * (float)i;
        float iscale[16];
        for (int g = 0; g < 16; g++) iscale[g] = rmx[g] * -c;
        qx_sums(x, w, wx, iscale, W, sumlx, suml2);
        for (int g = 0; g < 16; g++) {
            const int better = (suml2[g] > 0.0f) & (sumlx[g] * sumlx[g] > best[g] * suml2[g]);
            const float new_scale = sumlx[g] / (better ? suml2[g] : 1.0f);
            scale[g] = better ? new_scale : scale[g];
            best[g] = better ? new_scale * sumlx[g] : best[g];
            best_iscale[g] = better ? iscale[g] : best_iscale[g];
        }
    }
    float L[256];
    for (int e = 0; e < 16; e++)
        for (int g = 0; g < 16; g++) {
            const int i = e * 16 + g;
            L[i] = zero[g] ? 0.0f : clamp(rintf(best_iscale[g] * x[i]), -32.0f, 31.0f) + 32.0f;
        }
    for (int g = 0; g < 16; g++) scale[g] = zero[g] ? 0.0f : scale[g];

    /* _quantize_chunk: int8 group scales against the largest */
    int imax = 0;
    float amax = fabsf(scale[0]);
    for (int g = 1; g < 16; g++) if (fabsf(scale[g]) > amax) { amax = fabsf(scale[g]); imax = g; }
    float max_scale = scale[imax];
    if (fabsf(max_scale) < 1e-15f) { memset(q, 0, 210); return; }   /* all-zero block: memset 0 */
    const float iscale = rcp(max_scale) * -128.0f, d = rcp(iscale), d16 = f16r(d);
    uint8_t Lq[256];                                    /* block order: 16 g + e */
    int8_t sc[16];
    float dj[16];
    for (int g = 0; g < 16; g++) {
        const float s = clampmax(rintf(iscale * scale[g]), 127.0f);
        sc[g] = (int8_t)s;
        dj[g] = d16 * s;
    }
    for (int e = 0; e < 16; e++)
        for (int g = 0; g < 16; g++) {
            const int i = e * 16 + g;
            const int has = dj[g] != 0.0f;
            const float req = clamp(rintf(x[i] / (has ? dj[g] : 1.0f)), -32.0f, 31.0f) + 32.0f;
            Lq[16 * g + e] = (uint8_t)(has ? req : L[i]);
        }
    for (int h = 0; h < 2; h++) {
        const uint8_t *Lh = Lq + 128 * h;
        for (int l = 0; l < 32; l++) {
            const uint8_t a0 = Lh[l], a1 = Lh[32 + l], a2 = Lh[64 + l], a3 = Lh[96 + l];
            q[64 * h + l] = (uint8_t)((a0 & 0x0F) | ((a2 & 0x0F) << 4));
            q[64 * h + 32 + l] = (uint8_t)((a1 & 0x0F) | ((a3 & 0x0F) << 4));
            q[128 + 32 * h + l] = (uint8_t)((a0 >> 4) | ((a1 >> 4) << 2) | ((a2 >> 4) << 4) | ((a3 >> 4) << 6));
        }
    }
    memcpy(q + 192, sc, 16);
    wr16(q + 208, f2h(d));
}

void gt_quant_q6_k(const float *restrict x, uint8_t *restrict q, int64_t n, int64_t lanes) {
    for (int64_t b = 0; b < n; b++, x += 256, q += 210) {
        if (lanes == 8) q6_k_block(x, q, 8);
        else if (lanes == 16) q6_k_block(x, q, 16);
        else q6_k_block(x, q, 4);
    }
}

/* ---- NF4 (nf4.py: `encode`) ---- */

void gt_quant_nf4(const float *restrict x, uint8_t *restrict q, int64_t n) {
    float mid[15];
    for (int k = 0; k < 15; k++) mid[k] = (NF4_CODE[k + 1] + NF4_CODE[k]) / 2.0f;
    for (int64_t b = 0; b < n; b++, x += 64, q += 36) {
        float absmax = -INFINITY;
        for (int l = 0; l < 64; l++) { const float a = fabsf(x[l]); absmax = a > absmax ? a : absmax; }
        memcpy(q, &absmax, 4);
        const float scale = absmax == 0.0f ? 1.0f : absmax;
        uint8_t c[64];
        for (int l = 0; l < 64; l++) {                  /* bucketize(right=False): # of mid < v */
            const float v = x[l] / scale;
            int k = 0;
            for (int m = 0; m < 15; m++) k += mid[m] < v;
            c[l] = (uint8_t)k;
        }
        for (int l = 0; l < 32; l++) q[4 + l] = (uint8_t)((c[2 * l] << 4) | c[2 * l + 1]);
    }
}
