/* greentune.quant native dequantise kernels: packed GGUF blocks -> float32, one block after another.
 *
 * Built on first use by `kernels.py` with the system C compiler (cc -O3 -march=native
 * -ffp-contract=off) and called through ctypes. Each function computes exactly what the
 * format's plain-torch `_dequantize_blocks` computes, in the same order of fp32 operations
 * (no fused multiply-add: -ffp-contract=off), so the values are bit-identical; tests check it.
 */
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
