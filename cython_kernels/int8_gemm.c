/* Exact u8 x s8 matrix products accumulated into int64.
 *
 * C += weight * (X @ Y) with X uint8 in [0, x_max] (x_max <= 127 for the
 * AVX2 path, the caller's guarantee; the plain C path takes any uint8) and Y
 * int8 in [-128, 127].  Every product satisfies
 * |x*y| <= 127*128 = 16256 < 2^14; partial sums are kept in int32 over k
 * blocks short enough to be provably exact, and each block's partial is added
 * to C as weight*partial in unsigned (mod 2^64) arithmetic: exact whenever
 * the true result fits in int64, and never undefined behaviour.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_dispatch.h"
#include "int8_gemm.h"

#if MPL_X86
#include <immintrin.h>
#endif

static inline void add_weighted(int64_t *c, int64_t weight, int64_t v)
{
    *c = (int64_t)((uint64_t)*c + (uint64_t)weight * (uint64_t)v);
}

void mpl_gemm_start_fill(const mpl_gemm_start *start, int64_t *C, ptrdiff_t ldc, size_t m, size_t n)
{
    for (size_t i = 0; i < m; ++i)
        mpl_gemm_start_row(start, i, 0, n, C + (ptrdiff_t)i * ldc);
}

/* ------------------------------------------------------------ plain C --- */
/* i-k-j loops with an int32 row accumulator.  Any uint8 X (0..255, full 8-bit
 * digits) is exact here: with a k block of 65536,
 * |sum| <= 65536 * 255 * 128 = 2,139,095,040 < 2^31 - 1 = 2,147,483,647. */
#define C_KBLOCK 65536

int mpl_int8_gemm_acc_c(const uint8_t *X, const int8_t *Y, size_t m, size_t k, size_t n,
                        int64_t *C, ptrdiff_t ldc, int64_t weight)
{
    if (m == 0 || n == 0 || k == 0)
        return 0;
    int32_t *acc = (int32_t *)malloc(n * sizeof(int32_t));
    if (!acc)
        return -1;
    for (size_t i = 0; i < m; ++i) {
        const uint8_t *x = X + i * k;
        int64_t *c = C + (ptrdiff_t)i * ldc;
        for (size_t p0 = 0; p0 < k; p0 += C_KBLOCK) {
            size_t p1 = k - p0 < C_KBLOCK ? k : p0 + C_KBLOCK;
            memset(acc, 0, n * sizeof(int32_t));
            for (size_t p = p0; p < p1; ++p) {
                int32_t xv = x[p];
                if (xv == 0)
                    continue; /* low-resolution digits are often sparse */
                const int8_t *y = Y + p * n;
                for (size_t j = 0; j < n; ++j)
                    acc[j] += xv * (int32_t)y[j];
            }
            for (size_t j = 0; j < n; ++j)
                add_weighted(&c[j], weight, acc[j]);
        }
    }
    free(acc);
    return 0;
}

/* ------------------------------------------------------------- BLAS path --- */
void mpl_u8_block_to_f32(const uint8_t *X, size_t ldx, size_t rows, size_t cols, float *out)
{
    for (size_t i = 0; i < rows; ++i)
        for (size_t j = 0; j < cols; ++j)
            out[i * cols + j] = (float)X[i * ldx + j];
}

void mpl_s8_block_to_f32(const int8_t *Y, size_t ldy, size_t rows, size_t cols, float *out)
{
    for (size_t i = 0; i < rows; ++i)
        for (size_t j = 0; j < cols; ++j)
            out[i * cols + j] = (float)Y[i * ldy + j];
}

/* Cf holds exact integers of magnitude < 2^24, so the float->int32
 * conversion is exact (and, unlike float->int64, vectorizes without AVX-512). */
void mpl_acc_f32_block(int64_t *C, ptrdiff_t ldc, const float *Cf, size_t rows, size_t cols,
                       int64_t weight)
{
    for (size_t i = 0; i < rows; ++i) {
        int64_t *c = C + (ptrdiff_t)i * ldc;
        const float *f = Cf + i * cols;
        for (size_t j = 0; j < cols; ++j)
            add_weighted(&c[j], weight, (int32_t)f[j]);
    }
}

/* ------------------------------------------------------------------ AVX2 --- */
#if MPL_X86
/* GotoBLAS-style blocking.  Y is packed per (KC x NC) block into panels of 16
 * columns in which each 32-bit lane holds 4 consecutive k of one column:
 *     Bp[(panel*nq + q)*64 + 4*c + r] = Y[p0 + 4q + r, j0 + 16*panel + c].
 * The microkernel broadcasts 4 consecutive X bytes x[4q..4q+3] to all lanes;
 * vpmaddubsw (u8 x s8) gives x0*y0 + x1*y1 and x2*y2 + x3*y3 as int16, with
 * |pair| <= 2*127*128 = 32512 < 32767 so it never saturates; vpmaddwd with
 * ones adds the two halves into an int32 per column.  One microkernel call
 * covers kc <= KC k-values: |int32 sum| <= KC*16256 < 2^31 for KC <= 132104.
 * A 16-column micro-panel (KC*16 bytes) stays in L1 while MR-row slivers of X
 * stream past it; X is read in place (4-byte broadcasts), not packed. */
#define G_MR 4 /* the microkernels below are written for 4 rows */
#define G_NR 16
#ifndef G_KC
#define G_KC 1024 /* multiple of 4 */
#endif
#ifndef G_NC
#define G_NC 1024 /* multiple of G_NR */
#endif
#ifndef G_MC
#define G_MC 96   /* multiple of G_MR */
#endif

/* Pack Y[p0:p0+kc, j0:j0+nc] (kc a multiple of 4 except at the end of k; the
 * missing rows and columns are zero-filled). */
MPL_TARGET_AVX2 static void pack_b(const int8_t *Y, size_t n, size_t p0, size_t kc, size_t j0,
                                   size_t nc, int8_t *Bp)
{
    size_t nq = (kc + 3) / 4;
    size_t npanel = (nc + G_NR - 1) / G_NR;
    for (size_t pn = 0; pn < npanel; ++pn) {
        size_t jj = j0 + pn * G_NR;
        size_t cols = nc - pn * G_NR < G_NR ? nc - pn * G_NR : G_NR;
        int8_t *dst = Bp + pn * nq * 64;
        for (size_t q = 0; q < nq; ++q, dst += 64) {
            size_t p = p0 + 4 * q;
            if (cols == G_NR && 4 * q + 4 <= kc) {
                const int8_t *s = Y + p * n + jj;
                __m128i r0 = _mm_loadu_si128((const __m128i *)s);
                __m128i r1 = _mm_loadu_si128((const __m128i *)(s + n));
                __m128i r2 = _mm_loadu_si128((const __m128i *)(s + 2 * n));
                __m128i r3 = _mm_loadu_si128((const __m128i *)(s + 3 * n));
                __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
                __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
                _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi16(t0, t2));
                _mm_storeu_si128((__m128i *)(dst + 16), _mm_unpackhi_epi16(t0, t2));
                _mm_storeu_si128((__m128i *)(dst + 32), _mm_unpacklo_epi16(t1, t3));
                _mm_storeu_si128((__m128i *)(dst + 48), _mm_unpackhi_epi16(t1, t3));
            } else {
                memset(dst, 0, 64);
                for (size_t r = 0; r < 4 && 4 * q + r < kc; ++r)
                    for (size_t c = 0; c < cols; ++c)
                        dst[4 * c + r] = Y[(p + r) * n + jj + c];
            }
        }
    }
}

/* 4 bytes of an X row at p (only the first `avail` are real; rest zero). */
static inline int32_t load_x4(const uint8_t *x, size_t avail)
{
    int32_t v = 0;
    memcpy(&v, x, avail < 4 ? avail : 4);
    return v;
}

/* One k-quad step for the 4 rows: the broadcast x quad times the two Y
 * vectors (columns 0-7 and 8-15).  WIDEN(v) is vpmaddwd(v, ones) for the
 * int32 kernel and the identity for the int16 one; ADD is the matching add.
 * Written with named accumulators: arrays of vectors made gcc shuffle
 * registers with extra moves. */
#define MPL_QUAD_STEP(XV, ADD, WIDEN)                                                   \
    do {                                                                               \
        __m256i y0_ = _mm256_loadu_si256((const __m256i *)(bq));                       \
        __m256i y1_ = _mm256_loadu_si256((const __m256i *)(bq + 32));                  \
        __m256i x_;                                                                    \
        x_ = _mm256_set1_epi32(XV(0));                                                 \
        c00 = ADD(c00, WIDEN(_mm256_maddubs_epi16(x_, y0_)));                          \
        c01 = ADD(c01, WIDEN(_mm256_maddubs_epi16(x_, y1_)));                          \
        x_ = _mm256_set1_epi32(XV(1));                                                 \
        c10 = ADD(c10, WIDEN(_mm256_maddubs_epi16(x_, y0_)));                          \
        c11 = ADD(c11, WIDEN(_mm256_maddubs_epi16(x_, y1_)));                          \
        x_ = _mm256_set1_epi32(XV(2));                                                 \
        c20 = ADD(c20, WIDEN(_mm256_maddubs_epi16(x_, y0_)));                          \
        c21 = ADD(c21, WIDEN(_mm256_maddubs_epi16(x_, y1_)));                          \
        x_ = _mm256_set1_epi32(XV(3));                                                 \
        c30 = ADD(c30, WIDEN(_mm256_maddubs_epi16(x_, y0_)));                          \
        c31 = ADD(c31, WIDEN(_mm256_maddubs_epi16(x_, y1_)));                          \
    } while (0)

static inline int32_t ld32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#define MPL_XFULL(a) ld32(x##a + 4 * q)
#define MPL_XTAIL(a) load_x4(x##a + 4 * q, kc - 4 * q)
#define MPL_WIDEN32(v) _mm256_madd_epi16((v), ones)
#define MPL_NOWIDEN(v) (v)

/* acc[a][h] (int32, columns 8h..8h+7) = sum over kc of x_a * Bpanel. */
MPL_TARGET_AVX2 static void ukernel_i32(const uint8_t *const *xr, size_t kc, const int8_t *Bp,
                                        __m256i acc[G_MR][2])
{
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00;
    size_t nq_full = kc / 4, q;
    const int8_t *bq = Bp;
    for (q = 0; q < nq_full; ++q, bq += 64)
        MPL_QUAD_STEP(MPL_XFULL, _mm256_add_epi32, MPL_WIDEN32);
    if (4 * q < kc) /* k tail inside this block: zero-extend X's last quad */
        MPL_QUAD_STEP(MPL_XTAIL, _mm256_add_epi32, MPL_WIDEN32);
    acc[0][0] = c00; acc[0][1] = c01; acc[1][0] = c10; acc[1][1] = c11;
    acc[2][0] = c20; acc[2][1] = c21; acc[3][0] = c30; acc[3][1] = c31;
}

/* Small-digit variant: when X <= x_max, each int16 lane of vpmaddubsw is
 * bounded by 2*x_max*128 = 256*x_max, so T = floor(32767 / (256*x_max))
 * consecutive quads can be summed with wrapping vpaddw and the int16 total
 * still satisfies |s| <= T*256*x_max <= 32767 (no overflow); only then is it
 * widened with vpmaddwd.  x_max = 1 -> T = 127; x_max = 15 -> T = 8. */
MPL_TARGET_AVX2 static void ukernel_i16(const uint8_t *const *xr, size_t kc, const int8_t *Bp,
                                        size_t T, __m256i acc[G_MR][2])
{
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    __m256i w[G_MR][2]; /* int32 totals, touched once per T quads */
    for (int a = 0; a < G_MR; ++a)
        w[a][0] = w[a][1] = _mm256_setzero_si256();
    size_t nq = (kc + 3) / 4, nq_full = kc / 4;
    for (size_t q0 = 0; q0 < nq; q0 += T) {
        size_t q1 = nq - q0 < T ? nq : q0 + T;
        size_t qf = q1 < nq_full ? q1 : nq_full; /* full quads of this chunk */
        __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                c21 = c00, c30 = c00, c31 = c00;
        size_t q;
        const int8_t *bq = Bp + 64 * q0;
        for (q = q0; q < qf; ++q, bq += 64)
            MPL_QUAD_STEP(MPL_XFULL, _mm256_add_epi16, MPL_NOWIDEN);
        if (q < q1) /* k tail: zero-extend X's last quad */
            MPL_QUAD_STEP(MPL_XTAIL, _mm256_add_epi16, MPL_NOWIDEN);
        w[0][0] = _mm256_add_epi32(w[0][0], MPL_WIDEN32(c00));
        w[0][1] = _mm256_add_epi32(w[0][1], MPL_WIDEN32(c01));
        w[1][0] = _mm256_add_epi32(w[1][0], MPL_WIDEN32(c10));
        w[1][1] = _mm256_add_epi32(w[1][1], MPL_WIDEN32(c11));
        w[2][0] = _mm256_add_epi32(w[2][0], MPL_WIDEN32(c20));
        w[2][1] = _mm256_add_epi32(w[2][1], MPL_WIDEN32(c21));
        w[3][0] = _mm256_add_epi32(w[3][0], MPL_WIDEN32(c30));
        w[3][1] = _mm256_add_epi32(w[3][1], MPL_WIDEN32(c31));
    }
    for (int a = 0; a < G_MR; ++a) {
        acc[a][0] = w[a][0];
        acc[a][1] = w[a][1];
    }
}

/* C[rows, cols] += weight * acc.  If weight fits in int32, vpmuldq gives the
 * exact 64-bit product of the sign-extended int32 partials; otherwise scalar. */
MPL_TARGET_AVX2 static void store_tile(int64_t *C, ptrdiff_t ldc, int mr, int nr,
                                       __m256i acc[G_MR][2], int64_t weight)
{
    if (nr == G_NR && weight >= INT32_MIN && weight <= INT32_MAX) {
        const __m256i w = _mm256_set1_epi64x(weight);
        for (int a = 0; a < mr; ++a) {
            int64_t *c = C + (ptrdiff_t)a * ldc;
            for (int h = 0; h < 2; ++h) {
                __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc[a][h]));
                __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc[a][h], 1));
                __m256i c0 = _mm256_loadu_si256((const __m256i *)(c + 8 * h));
                __m256i c1 = _mm256_loadu_si256((const __m256i *)(c + 8 * h + 4));
                _mm256_storeu_si256((__m256i *)(c + 8 * h), _mm256_add_epi64(c0, _mm256_mul_epi32(lo, w)));
                _mm256_storeu_si256((__m256i *)(c + 8 * h + 4), _mm256_add_epi64(c1, _mm256_mul_epi32(hi, w)));
            }
        }
        return;
    }
    int32_t t[G_MR][G_NR] __attribute__((aligned(32)));
    for (int a = 0; a < mr; ++a) {
        _mm256_store_si256((__m256i *)t[a], acc[a][0]);
        _mm256_store_si256((__m256i *)(t[a] + 8), acc[a][1]);
        for (int b = 0; b < nr; ++b)
            add_weighted(C + (ptrdiff_t)a * ldc + b, weight, t[a][b]);
    }
}

MPL_TARGET_AVX2 static int gemm_avx2(const uint8_t *X, const int8_t *Y, size_t m, size_t k,
                                     size_t n, int64_t *C, ptrdiff_t ldc, int64_t weight, int x_max)
{
    size_t T = x_max > 0 ? (size_t)(32767 / (256 * x_max)) : 32767;
    size_t ncap = n < G_NC ? n : G_NC;
    size_t kcap = k < G_KC ? k : G_KC;
    size_t bsize = ((ncap + G_NR - 1) / G_NR) * ((kcap + 3) / 4) * 64;
    int8_t *Bp = (int8_t *)aligned_alloc(64, (bsize + 63) / 64 * 64);
    if (!Bp)
        return -1;
    for (size_t j0 = 0; j0 < n; j0 += G_NC) {
        size_t nc = n - j0 < G_NC ? n - j0 : G_NC;
        for (size_t p0 = 0; p0 < k; p0 += G_KC) {
            size_t kc = k - p0 < G_KC ? k - p0 : G_KC;
            size_t nq = (kc + 3) / 4;
            pack_b(Y, n, p0, kc, j0, nc, Bp);
            for (size_t i0 = 0; i0 < m; i0 += G_MC) {
                size_t mc = m - i0 < G_MC ? m - i0 : G_MC;
                for (size_t jr = 0; jr < nc; jr += G_NR) {
                    int nr = nc - jr < G_NR ? (int)(nc - jr) : G_NR;
                    const int8_t *Bpanel = Bp + (jr / G_NR) * nq * 64;
                    for (size_t ir = 0; ir < mc; ir += G_MR) {
                        int mr = mc - ir < G_MR ? (int)(mc - ir) : G_MR;
                        const uint8_t *xr[G_MR];
                        for (int a = 0; a < G_MR; ++a) /* missing rows: recompute row 0, drop */
                            xr[a] = X + (i0 + ir + (size_t)(a < mr ? a : 0)) * k + p0;
                        __m256i acc[G_MR][2];
                        if (T >= 2)
                            ukernel_i16(xr, kc, Bpanel, T, acc);
                        else
                            ukernel_i32(xr, kc, Bpanel, acc);
                        store_tile(C + (ptrdiff_t)(i0 + ir) * ldc + (ptrdiff_t)(j0 + jr), ldc,
                                   mr, nr, acc, weight);
                    }
                }
            }
        }
    }
    free(Bp);
    return 0;
}
#endif

/* AVX2 if the CPU has it, else the plain C path. */
int mpl_int8_gemm_acc_avx2(const uint8_t *X, const int8_t *Y, size_t m, size_t k, size_t n,
                           int64_t *C, ptrdiff_t ldc, int64_t weight, int x_max)
{
    if (m == 0 || n == 0 || k == 0)
        return 0;
#if MPL_X86
    if (mpl_cpu_avx2())
        return gemm_avx2(X, Y, m, k, n, C, ldc, weight, x_max);
#endif
    (void)x_max;
    return mpl_int8_gemm_acc_c(X, Y, m, k, n, C, ldc, weight);
}
