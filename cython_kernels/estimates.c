/* Elementwise passes of mpilayer's resolution estimates; see estimates.h. */
#include "estimates.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* No fused multiply-add: the same estimate on every CPU and clone (the rounding allowances
 * of estimates.py assume separately rounded operations, which FMA only makes more accurate). */
#pragma GCC optimize("fp-contract=off")

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(MPL_NO_SIMD) && defined(__GNUC__) && !defined(__clang__)
#define MPL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MPL_CLONES
#endif

void mpl_row_histograms(const int8_t *q, size_t rows, size_t cols, ptrdiff_t row_stride,
                        ptrdiff_t col_stride, int64_t *counts)
{
    if (col_stride == 1 || row_stride != 1) {          /* rows contiguous: row by row */
        uint32_t sub[4][256];  /* four interleaved counters: no store-to-load chain per value */
        for (size_t i = 0; i < rows; i++) {
            const int8_t *r = q + (ptrdiff_t)i * row_stride;
            int64_t *c = counts + 256 * i;
            size_t j = 0;
            while (j < cols) {   /* blocks of at most 2**32 - 1 columns per counter */
                const size_t stop = cols - j > 0xFFFFFFF0u ? j + 0xFFFFFFF0u : cols;
                memset(sub, 0, sizeof sub);
                for (; j + 4 <= stop; j += 4) {
                    sub[0][(uint8_t)(r[(ptrdiff_t)j * col_stride] + 128)]++;
                    sub[1][(uint8_t)(r[(ptrdiff_t)(j + 1) * col_stride] + 128)]++;
                    sub[2][(uint8_t)(r[(ptrdiff_t)(j + 2) * col_stride] + 128)]++;
                    sub[3][(uint8_t)(r[(ptrdiff_t)(j + 3) * col_stride] + 128)]++;
                }
                for (; j < stop; j++)
                    sub[0][(uint8_t)(r[(ptrdiff_t)j * col_stride] + 128)]++;
                for (int v = 0; v < 256; v++)
                    c[v] += (int64_t)sub[0][v] + sub[1][v] + sub[2][v] + sub[3][v];
            }
        }
    } else {                                           /* columns of a row-major block: memory order */
        for (size_t j = 0; j < cols; j++) {
            const int8_t *r = q + (ptrdiff_t)j * col_stride;
            for (size_t i = 0; i < rows; i++)
                counts[256 * i + (int)r[i] + 128]++;
        }
    }
}

static inline double dmin(double x, double y) { return x < y ? x : y; }
static inline double dmax(double x, double y) { return x > y ? x : y; }
static inline int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
static inline int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

/* ceil/floor of x as int64 where representable (|x| < 2**62), else the fallback (a valid end);
 * by conversion and selects rather than libm calls and branches, so that the loops vectorise. */
#define MPL_I62 4611686018427387904.0
static inline int64_t ceil_or(double x, int64_t fallback)
{
    const int ok = fabs(x) < MPL_I62;
    const double xs = ok ? x : 0.0;
    const int64_t t = (int64_t)xs;             /* toward zero */
    const int64_t c = t + (xs > (double)t);
    return ok ? c : fallback;
}
static inline int64_t floor_or(double x, int64_t fallback)
{
    const int ok = fabs(x) < MPL_I62;
    const double xs = ok ? x : 0.0;
    const int64_t t = (int64_t)xs;
    const int64_t f = t - (xs < (double)t);
    return ok ? f : fallback;
}
/* a nonnegative int64 as a double at or above it: exact below 2**53, above it the conversion
 * may round down by less than an ulp, which 1 + 2**-51 more than covers */
static inline double up(int64_t x)
{
    const double d = (double)x;
    return x > ((int64_t)1 << 53) ? d * (1.0 + 0x1p-51) : d;
}
/* The fitted estimate of one element, alpha_i gamma_j acc + alpha_i rowsum(T_A)_i c_j
 * + b_i gamma_j colsum(T_B)_j + k b_i c_j (estimates.py), and in *slack the allowance for the
 * rounding of its four terms and their sum. */
static inline double fitted(int64_t acc, double al, double alta, double ba, double gamma, double bb,
                            double tb, double kd, double round_rel, double *slack)
{
    const double t1 = ((double)acc * al) * gamma;
    const double t2 = alta * bb;
    const double t3 = ba * (gamma * tb);
    const double t4 = kd * (ba * bb);
    *slack = round_rel * (((fabs(t1) + fabs(t2)) + fabs(t3)) + fabs(t4));
    return ((t1 + t2) + t3) + t4;
}

/* x rounded half to even (numpy.rint), for |x| < 2**62 */
static inline int64_t round_even(double x)
{
    const int64_t t = floor_or(x, 0);
    const double frac = x - (double)t;         /* exact: x - floor(x) is representable */
    return t + (frac > 0.5) + ((frac == 0.5) & (t & 1));
}

/* Per row, simple loops over the row's columns (estimate and radius; truncation interval;
 * intersection; rounding and sums), vectorisable, compiled for x86-64-v4 (AVX-512) and v3
 * (AVX2) besides the baseline, chosen at load time. Floating-point contraction is off (see the
 * pragma at the top): every CPU computes the same estimate bit for bit. */
MPL_CLONES
void mpl_estimate_tile(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k, int64_t delta,
                       double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                       double *est_f, int64_t *est_i, int64_t *lo, int64_t *hi, ptrdiff_t ld_out,
                       mpl_tile_sums *sums)
{
    double bound = 0.0, est_sq = 0.0, peak = 0.0;
    const double kd = (double)k;
    const double *restrict b_alpha = b->alpha, *restrict b_ta = b->ta, *restrict b_b = b->b;
    const double *restrict b_dinf = b->dinf, *restrict b_r2 = b->r2, *restrict b_h1 = b->h1;
    const double *restrict b_h2 = b->h2, *restrict b_q1 = b->q1, *restrict b_q2 = b->q2;
    const double *restrict b_scale = b->scale;
    const int64_t *restrict b_pf = b->pos_full, *restrict b_nf = b->neg_full;
    const int64_t *restrict b_pt = b->pos_trunc, *restrict b_nt = b->neg_trunc;
    const int64_t *restrict b_zc = b->zc, *restrict b_z = b->z;
    double *restrict e = malloc(n * sizeof(double));
    double *restrict rad = malloc(n * sizeof(double));
    int64_t *restrict lt = malloc(n * sizeof(int64_t));
    int64_t *restrict ht = malloc(n * sizeof(int64_t));
    if (!e || !rad || !lt || !ht) {
        free(e); free(rad); free(lt); free(ht);
        sums->bound = -1.0;   /* the caller raises MemoryError */
        return;
    }
    for (size_t i = 0; i < m; i++) {
        const double al = a->alpha[i], alta = a->alpha[i] * a->ta[i], ba = a->b[i];
        const double dinf_a = a->dinf[i], r2_a = a->r2[i], h1_a = a->h1[i], h2_a = a->h2[i];
        const double q1_a = a->q1[i], q2_a = a->q2[i];
        const double sa = a->scale ? a->scale[i] : 1.0;
        const int64_t pf = a->pos_full[i], nf = a->neg_full[i], pt = a->pos_trunc[i], nt = a->neg_trunc[i];
        const int64_t zc = a->zc[i], za = a->z[i];
        const int64_t *restrict row = acc + (ptrdiff_t)i * ld_acc;
        /* 1: the fitted estimate (four terms), the allowance for its rounding, the Hölder radius */
        for (size_t j = 0; j < n; j++) {
            double slack;
            e[j] = fitted(row[j], al, alta, ba, b_alpha[j], b_b[j], b_ta[j], kd, round_rel, &slack);
            const double first = dmin(dinf_a * b_q1[j], r2_a * b_q2[j]) + dmin(h1_a * b_dinf[j], h2_a * b_r2[j]);
            const double second = dmin(q1_a * b_dinf[j], q2_a * b_r2[j]) + dmin(dinf_a * b_h1[j], r2_a * b_h2[j]);
            rad[j] = dmin(first, second) * (1.0 + round_rel) + slack;
        }
        /* 2: the truncation interval around the integer centre acc + Z */
        for (size_t j = 0; j < n; j++) {
            const int64_t centre = row[j] + zc * b_z[j] + za * b_zc[j];
            lt[j] = delta * imax(nt + b_nf[j], nf + b_nt[j]) + centre;
            ht[j] = delta * imin(pt + b_pf[j], pf + b_pt[j]) + centre;
        }
        /* 3: intersect (lt, ht become the interval) and clip the estimate into it */
        for (size_t j = 0; j < n; j++) {
            const int64_t l = imax(lt[j], ceil_or(e[j] - rad[j], lt[j]));
            const int64_t h = imin(ht[j], floor_or(e[j] + rad[j], ht[j]));
            lt[j] = l;
            ht[j] = h;
            e[j] = dmin(dmax(e[j], (double)l), (double)h);
        }
        /* 4: integers are rounded half to even (numpy.rint) and kept in [l, h] exactly; the
         * certified width, the sums and the peak, scaled for real inputs */
        int64_t *restrict ei = (int64_t *)rad;   /* rad is no longer needed: reuse its storage */
        if (integer) {
            for (size_t j = 0; j < n; j++) {
                const int64_t x = imin(imax(round_even(e[j]), lt[j]), ht[j]);
                ei[j] = x;
                e[j] = (double)x;
                bound = dmax(bound, up(imax(x - lt[j], ht[j] - x)));
                est_sq += e[j] * e[j];
                peak = dmax(peak, fabs(e[j]));
            }
        } else if (b_scale) {
            for (size_t j = 0; j < n; j++) {
                const double s = sa * b_scale[j];
                const double y = (e[j] * sa) * b_scale[j];
                bound = dmax(bound, dmax(e[j] - (double)lt[j], (double)ht[j] - e[j]) * s);
                est_sq += y * y;
                peak = dmax(peak, fabs(y));
            }
        } else {
            for (size_t j = 0; j < n; j++) {
                bound = dmax(bound, dmax(e[j] - (double)lt[j], (double)ht[j] - e[j]));
                est_sq += e[j] * e[j];
                peak = dmax(peak, fabs(e[j]));
            }
        }
        const ptrdiff_t o = (ptrdiff_t)i * ld_out;
        if (est_f) memcpy(est_f + o, e, n * sizeof(double));
        if (est_i) memcpy(est_i + o, ei, n * sizeof(int64_t));
        if (lo) {
            memcpy(lo + o, lt, n * sizeof(int64_t));
            memcpy(hi + o, ht, n * sizeof(int64_t));
        }
    }
    free(e); free(rad); free(lt); free(ht);
    sums->bound = bound;
    sums->estimate_sq = est_sq;
    sums->peak = peak;
}

/* The estimate alone, for publishing (no interval): the four terms, the largest rounding
 * allowance of their sum, and the sums; the caller bounds the error from separable maxima. */
MPL_CLONES
void mpl_estimate_fast(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k,
                       double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                       double *est_f, int64_t *est_i, ptrdiff_t ld_out, mpl_tile_sums *sums)
{
    double slack_max = 0.0, est_sq = 0.0, peak = 0.0;
    const double kd = (double)k;
    const double *restrict b_alpha = b->alpha, *restrict b_ta = b->ta, *restrict b_b = b->b;
    const double *restrict b_scale = b->scale;
    double *restrict e = malloc(n * sizeof(double));
    double *restrict sl = malloc(n * sizeof(double));
    if (!e || !sl) {
        free(e); free(sl);
        sums->bound = -1.0;
        return;
    }
    for (size_t i = 0; i < m; i++) {
        const double al = a->alpha[i], alta = a->alpha[i] * a->ta[i], ba = a->b[i];
        const double sa = a->scale ? a->scale[i] : 1.0;
        const int64_t *restrict row = acc + (ptrdiff_t)i * ld_acc;
        for (size_t j = 0; j < n; j++) {
            e[j] = fitted(row[j], al, alta, ba, b_alpha[j], b_b[j], b_ta[j], kd, round_rel, &sl[j]);
        }
        const ptrdiff_t o = (ptrdiff_t)i * ld_out;
        if (integer) {
            int64_t *restrict out = est_i ? est_i + o : (int64_t *)sl;
            for (size_t j = 0; j < n; j++) {
                slack_max = dmax(slack_max, sl[j]);
                const int64_t x = round_even(e[j]);
                const double y = (double)x;
                est_sq += y * y;
                peak = dmax(peak, fabs(y));
                out[j] = x;
            }
        } else {
            for (size_t j = 0; j < n; j++) {
                const double s = b_scale ? sa * b_scale[j] : 1.0;
                const double y = b_scale ? (e[j] * sa) * b_scale[j] : e[j];
                slack_max = dmax(slack_max, sl[j] * s);
                est_sq += y * y;
                peak = dmax(peak, fabs(y));
            }
            if (est_f) memcpy(est_f + o, e, n * sizeof(double));
        }
    }
    free(e); free(sl);
    sums->bound = slack_max;   /* the rounding allowance only; the caller adds the radius */
    sums->estimate_sq = est_sq;
    sums->peak = peak;
}
