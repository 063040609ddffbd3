/* Fused quantise-and-encode of operand blocks (quantize.h documents the contract).
 *
 * Bit-identical to mpilayer.quantization.quantize_real_block + estimates.shifted +
 * protocol.encode_component: y = (double)x / s (IEEE division, as numpy's float64 true divide
 * of the promoted operands); rint half to even by adding and subtracting 2**52 (exact for
 * |y| < 2**52 under round-to-nearest; larger |y| are integers already, and clip anyway);
 * clip to [-qmax, qmax]; q - z wrapping in the storage width (numpy's in-place int8/int16
 * subtraction of z cast to that dtype). No -ffast-math: the compiler may not fold the 2**52
 * addition away. Each row is quantised in one vectorisable loop, then encoded while in cache.
 * The baseline build does not vectorise the loop (the double to int8/int16 narrowing): 3 ns per
 * element; compiled for AVX-512 F/BW/VL it takes 0.7 ns, so that copy is chosen at run time. Both
 * compute the same IEEE operations in the same order: identical bits.
 */
#include "quantize.h"
#include "estimates.h"

#include "cpu_dispatch.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAGIC 4503599627370496.0 /* 2**52 */

static inline double rint_even(double y)
{
    double t = fabs(y);
    double r = (t + MAGIC) - MAGIC;
    t = t < MAGIC ? r : t;
    return copysign(t, y);
}

/* One row: q[j] = wrap(clip(rint(x[j] / s_j)) - z_j). Specialised on the presence of per-column
 * scales and zero points (constant flags), so that each variant is a straight vector loop. NAME is
 * the portable function; NAME##_avx512 (x86) the same body compiled for AVX-512. */
#define QUANT_ROW(NAME, XT, QT, UT)                                                              \
    static inline __attribute__((always_inline)) void NAME##_body(                               \
        const XT *restrict x, size_t n, double s0, const double *restrict sc, int64_t z0,         \
        const int64_t *restrict zc, double qmax, QT *restrict q, const int has_sc, const int has_zc) \
    {                                                                                            \
        for (size_t j = 0; j < n; j++) {                                                         \
            double s = has_sc ? sc[j] : s0;                                                      \
            double y = rint_even((double)x[j] / s);                                              \
            y = y > qmax ? qmax : y;                                                             \
            y = y < -qmax ? -qmax : y;                                                           \
            UT z = (UT)(has_zc ? zc[j] : z0);                                                    \
            q[j] = (QT)(UT)((UT)(int32_t)y - z);                                                 \
        }                                                                                        \
    }                                                                                            \
    QUANT_VARIANT(NAME, , XT, QT, )                                                              \
    QUANT_AVX512(NAME, XT, QT)

#define QUANT_VARIANT(NAME, SUFFIX, XT, QT, ATTR)                                                \
    static ATTR void NAME##SUFFIX(const XT *x, size_t n, double s0, const double *sc, int64_t z0,\
                                  const int64_t *zc, double qmax, QT *q)                         \
    {                                                                                            \
        if (sc && zc)                                                                            \
            NAME##_body(x, n, s0, sc, z0, zc, qmax, q, 1, 1);                                    \
        else if (sc)                                                                             \
            NAME##_body(x, n, s0, sc, z0, zc, qmax, q, 1, 0);                                    \
        else if (zc)                                                                             \
            NAME##_body(x, n, s0, sc, z0, zc, qmax, q, 0, 1);                                    \
        else                                                                                     \
            NAME##_body(x, n, s0, sc, z0, zc, qmax, q, 0, 0);                                    \
    }

#if MPL_X86
#define MPL_TARGET_AVX512Q __attribute__((target("avx512f,avx512bw,avx512vl,avx2")))
#define QUANT_AVX512(NAME, XT, QT) QUANT_VARIANT(NAME, _avx512, XT, QT, MPL_TARGET_AVX512Q)
#else
#define QUANT_AVX512(NAME, XT, QT)
#endif

QUANT_ROW(quant_f32_i8, float, int8_t, uint8_t)
QUANT_ROW(quant_f64_i8, double, int8_t, uint8_t)
QUANT_ROW(quant_f32_i16, float, int16_t, uint16_t)
QUANT_ROW(quant_f64_i16, double, int16_t, uint16_t)

/* Append n bits (bits[j] in {0, 1}) to a packed MSB-first stream at bit *pos of buf (zeroed). */
static void put_bits(uint8_t *buf, size_t *pos, const uint8_t *bits, size_t n)
{
    size_t p = *pos, j = 0;
    for (; j < n && (p & 7); j++, p++)
        buf[p >> 3] |= (uint8_t)(bits[j] << (7 - (p & 7)));
    uint8_t *out = buf + (p >> 3);
    for (; j + 8 <= n; j += 8, p += 8)
        *out++ = (uint8_t)((bits[j] << 7) | (bits[j + 1] << 6) | (bits[j + 2] << 5) | (bits[j + 3] << 4) |
                           (bits[j + 4] << 3) | (bits[j + 5] << 2) | (bits[j + 6] << 1) | bits[j + 7]);
    for (; j < n; j++, p++)
        buf[p >> 3] |= (uint8_t)(bits[j] << (7 - (p & 7)));
    *pos = p;
}

/* Encode row i (n elements, unsigned view u) of a block into every field's buffer. */
#define ENCODE_ROW(NAME, UT)                                                                     \
    static void NAME(const UT *restrict u, size_t n, size_t row_start, const mpl_fields *f,        \
                     size_t (*pos)[3], uint8_t *restrict tmp)                                     \
    {                                                                                            \
        for (int k = 0; k < f->n; k++) {                                                         \
            int lo = f->lo[k], w = f->width[k];                                                   \
            if (w <= 3) {                                                                        \
                for (int p = 0; p < w; p++) {                                                    \
                    int b = lo + p;                                                              \
                    for (size_t j = 0; j < n; j++)                                               \
                        tmp[j] = (uint8_t)((u[j] >> b) & 1u);                                     \
                    put_bits((uint8_t *)f->out[k], &pos[k][p], tmp, n);                          \
                }                                                                                \
            } else if (w <= 8) {                                                                 \
                uint8_t *restrict o = (uint8_t *)f->out[k] + row_start;                          \
                unsigned mask = (1u << w) - 1u;                                                  \
                for (size_t j = 0; j < n; j++)                                                   \
                    o[j] = (uint8_t)((u[j] >> lo) & mask);                                       \
            } else {                                                                             \
                uint16_t *restrict o = (uint16_t *)f->out[k] + row_start;                        \
                unsigned mask = (1u << w) - 1u;                                                  \
                for (size_t j = 0; j < n; j++)                                                   \
                    o[j] = (uint16_t)((u[j] >> lo) & mask);                                      \
            }                                                                                    \
        }                                                                                        \
    }

ENCODE_ROW(encode_row_u8, uint8_t)
ENCODE_ROW(encode_row_u16, uint16_t)

static void init_positions(const mpl_fields *f, size_t size, size_t (*pos)[3])
{
    for (int k = 0; k < f->n; k++)
        for (int p = 0; p < 3; p++)
            pos[k][p] = (size_t)p * size;
}

/* One row of q from x (row scale s, row zero point z), by the AVX-512 loop if `simd`. */
static void quant_row(const void *x, int x_is_double, size_t cols, double s, const double *s_cols, int64_t z,
                      const int64_t *z_cols, double dq, void *q, int q_elsize, int simd)
{
#if MPL_X86
    if (simd) {
        if (q_elsize == 1 && x_is_double)
            quant_f64_i8_avx512((const double *)x, cols, s, s_cols, z, z_cols, dq, (int8_t *)q);
        else if (q_elsize == 1)
            quant_f32_i8_avx512((const float *)x, cols, s, s_cols, z, z_cols, dq, (int8_t *)q);
        else if (x_is_double)
            quant_f64_i16_avx512((const double *)x, cols, s, s_cols, z, z_cols, dq, (int16_t *)q);
        else
            quant_f32_i16_avx512((const float *)x, cols, s, s_cols, z, z_cols, dq, (int16_t *)q);
        return;
    }
#else
    (void)simd;
#endif
    if (q_elsize == 1 && x_is_double)
        quant_f64_i8((const double *)x, cols, s, s_cols, z, z_cols, dq, (int8_t *)q);
    else if (q_elsize == 1)
        quant_f32_i8((const float *)x, cols, s, s_cols, z, z_cols, dq, (int8_t *)q);
    else if (x_is_double)
        quant_f64_i16((const double *)x, cols, s, s_cols, z, z_cols, dq, (int16_t *)q);
    else
        quant_f32_i16((const float *)x, cols, s, s_cols, z, z_cols, dq, (int16_t *)q);
}

int mpl_quantize_simd(void)
{
    return mpl_cpu_avx512();
}

int mpl_quantize_encode(const void *x, int x_is_double, size_t rows, size_t cols, ptrdiff_t ldx,
                        double s0, const double *s_rows, const double *s_cols,
                        const int64_t *z_rows, const int64_t *z_cols, int qmax,
                        void *q, int q_elsize, const mpl_fields *fields, int simd)
{
    size_t pos[MPL_MAX_FIELDS][3];
    uint8_t *tmp = NULL;
    int n_fields = fields ? fields->n : 0;
    if (n_fields) {
        tmp = (uint8_t *)malloc(cols ? cols : 1);
        if (!tmp)
            return -1;
        init_positions(fields, rows * cols, pos);
    }
    double dq = (double)qmax;
    size_t xsize = x_is_double ? sizeof(double) : sizeof(float);
    simd = simd && mpl_quantize_simd();
    for (size_t i = 0; i < rows; i++) {
        void *qr = (char *)q + i * cols * (size_t)q_elsize;
        quant_row((const char *)x + i * (size_t)ldx * xsize, x_is_double, cols, s_rows ? s_rows[i] : s0, s_cols,
                  z_rows ? z_rows[i] : 0, z_cols, dq, qr, q_elsize, simd);
        if (n_fields && q_elsize == 1)
            encode_row_u8((const uint8_t *)qr, cols, i * cols, fields, pos, tmp);
        else if (n_fields)
            encode_row_u16((const uint16_t *)qr, cols, i * cols, fields, pos, tmp);
    }
    free(tmp);
    return 0;
}

int mpl_encode_fields(const void *q, int q_elsize, size_t rows, size_t cols, ptrdiff_t ldq,
                      const mpl_fields *fields)
{
    size_t pos[MPL_MAX_FIELDS][3];
    if (!fields || fields->n == 0)
        return 0;
    uint8_t *tmp = (uint8_t *)malloc(cols ? cols : 1);
    if (!tmp)
        return -1;
    init_positions(fields, rows * cols, pos);
    for (size_t i = 0; i < rows; i++) {
        if (q_elsize == 1)
            encode_row_u8((const uint8_t *)q + i * ldq, cols, i * cols, fields, pos, tmp);
        else
            encode_row_u16((const uint16_t *)q + i * ldq, cols, i * cols, fields, pos, tmp);
    }
    free(tmp);
    return 0;
}

/* ------------------------------------------------------------------ exact tile */

/* The estimate pass's exact mode over the accumulator. */
int mpl_exact_tile(const int64_t *acc, size_t m, size_t n, const int64_t *zca, const int64_t *za,
                   const int64_t *zb, const int64_t *sqb, const double *sa, const double *sb,
                   double *out_f, int64_t *out_i, double *est_sq, double *peak)
{
    mpl_estimate_ctx *c = mpl_exact_begin(m, sa, sb, zca, za, zb, sqb);
    if (!c)
        return -1;
    mpl_estimate_rows(c, 0, 0, acc, (ptrdiff_t)n, sa ? (void *)out_f : (void *)out_i, (ptrdiff_t)n, m, n);
    mpl_tile_sums sums;
    mpl_estimate_end(c, &sums);
    *est_sq = sums.estimate_sq;
    *peak = sums.peak;
    return 0;
}

/* ------------------------------------------------------------------ digits of a field */

#define DIGITS_LOOP(T, EXTRACT)                                                                  \
    do {                                                                                         \
        const T *v = (const T *)q;                                                               \
        if (n == 1) {                                                                            \
            uint8_t *o0 = out[0];                                                                \
            for (size_t i = 0; i < count; i++) {                                                 \
                int32_t x = EXTRACT;                                                             \
                o0[i] = (uint8_t)((top_mask ? (x & top_mask) : x) ^ f_top);                      \
            }                                                                                    \
        } else if (n == 2) {                                                                     \
            uint8_t *o0 = out[0], *o1 = out[1];                                                  \
            for (size_t i = 0; i < count; i++) {                                                 \
                int32_t x = EXTRACT;                                                             \
                o0[i] = (uint8_t)((x & low_mask) ^ f0);                                          \
                int32_t h = x >> d;                                                              \
                o1[i] = (uint8_t)((top_mask ? (h & top_mask) : h) ^ f_top);                      \
            }                                                                                    \
        } else {                                                                                 \
            for (size_t i = 0; i < count; i++) {                                                 \
                int32_t x = EXTRACT;                                                             \
                for (int t = 0; t < n; t++) {                                                    \
                    int32_t y = x >> (d * t);                                                    \
                    if (t < n - 1)                                                               \
                        y &= low_mask;                                                           \
                    else if (top_mask)                                                           \
                        y &= top_mask;                                                           \
                    out[t][i] = (uint8_t)(y ^ (int32_t)flip[t]);                                 \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    } while (0)

void mpl_field_digits(const void *q, int elsize, size_t count, int lo, int width, int sign, int d, int n,
                      const unsigned *flip, uint8_t *const *out)
{
    const int32_t field_mask = (int32_t)((1u << width) - 1u), low_mask = (int32_t)((1u << d) - 1u);
    /* the top digit's mask: the field's bits above the lower digits (none when sign-extended) */
    const int32_t top_mask = sign ? 0 : (int32_t)((1u << (width - d * (n - 1))) - 1u);
    const int32_t f0 = (int32_t)flip[0], f_top = (int32_t)flip[n - 1];
    if (elsize == 1) {
        if (sign)
            DIGITS_LOOP(int8_t, (int32_t)v[i] >> lo);
        else
            DIGITS_LOOP(uint8_t, ((int32_t)v[i] >> lo) & field_mask);
    } else {
        if (sign)
            DIGITS_LOOP(int16_t, (int32_t)v[i] >> lo);
        else
            DIGITS_LOOP(uint16_t, ((int32_t)v[i] >> lo) & field_mask);
    }
}
