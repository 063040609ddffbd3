/* Exact u8 x s8 -> int64 matrix products with VNNI (vpdpbusd).
 *
 * C += weight * (X @ Y) with X uint8 (any value 0..255: full 8-bit digits)
 * and Y int8, Y pre-packed once per operand (mpl_vnni_pack_b) so that every
 * product with the same Y reuses the packing.
 *
 * vpdpbusd adds, per 32-bit lane, four u8*s8 products to an int32 without
 * saturation.  |four products| <= 4*255*128 = 130560 < 2^17, so an int32
 * accumulator is exact for up to floor((2^31-1)/130560) = 16448 quads, i.e.
 * 65792 k values; blocks of V_KC <= 65536 k are summed in int32 and then added
 * to C as weight*partial in unsigned (mod 2^64) arithmetic, exact whenever the
 * true result fits in int64, like the other kernels.
 *
 * Paths: zmm (AVX512-VNNI), and ymm with the same body compiled twice: VEX
 * encoded (AVX-VNNI, CPUs such as Alder Lake / Sapphire Rapids) and EVEX
 * encoded (AVX512-VNNI + VL; lets CPUs without AVX-VNNI test the ymm body).
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_dispatch.h"
#include "estimates.h"
#include "int8_gemm.h"

#if MPL_X86
#include <immintrin.h>
#endif

/* Packed Y: panels of 64 columns; in a panel, quad q (k = 4q..4q+3) is 256
 * bytes with byte 4c + r = Y[4q + r, 64*panel + c] (zero beyond k and n), so a
 * 32-bit lane holds four consecutive k of one column, as vpdpbusd wants. */
#define V_PANEL 64
#define V_QBYTES (4 * V_PANEL)

size_t mpl_vnni_packed_size(size_t k, size_t n)
{
    return ((n + V_PANEL - 1) / V_PANEL) * ((k + 3) / 4) * V_QBYTES;
}

/* Portable packer (also the edge case of the SIMD one); values shifted right (arithmetic) by
 * `shift`. */
static void pack_quad_c(const int8_t *Y, size_t k, size_t n, size_t q, size_t j0, int shift, int8_t *dst)
{
    memset(dst, 0, V_QBYTES);
    for (size_t r = 0; r < 4 && 4 * q + r < k; ++r)
        for (size_t c = 0; c < V_PANEL && j0 + c < n; ++c)
            dst[4 * c + r] = (int8_t)(Y[(4 * q + r) * n + j0 + c] >> shift);
}

#if MPL_X86
/* Bytes shifted right (arithmetic) by the count in `sh`: the high byte of each 16-bit lane by
 * a 16-bit shift, the low one moved up first. */
MPL_TARGET_AVX2 static inline __m128i sra_bytes(__m128i x, __m128i sh, __m128i sh8)
{
    const __m128i high = _mm_set1_epi16((short)0xff00);
    __m128i hi = _mm_and_si128(_mm_sra_epi16(x, sh), high);
    __m128i lo = _mm_andnot_si128(high, _mm_sra_epi16(_mm_slli_epi16(x, 8), sh8));
    return _mm_or_si128(hi, lo);
}

/* 4 rows x 16 columns -> 64 interleaved bytes (byte 4c + r), with SSE2 unpacks; values shifted
 * right by `shift`. */
MPL_TARGET_AVX2 static inline void interleave4x16(const int8_t *s, size_t n, int shift, int8_t *dst)
{
    __m128i r0 = _mm_loadu_si128((const __m128i *)s);
    __m128i r1 = _mm_loadu_si128((const __m128i *)(s + n));
    __m128i r2 = _mm_loadu_si128((const __m128i *)(s + 2 * n));
    __m128i r3 = _mm_loadu_si128((const __m128i *)(s + 3 * n));
    if (shift) {
        const __m128i sh = _mm_cvtsi32_si128(shift), sh8 = _mm_cvtsi32_si128(shift + 8);
        r0 = sra_bytes(r0, sh, sh8);
        r1 = sra_bytes(r1, sh, sh8);
        r2 = sra_bytes(r2, sh, sh8);
        r3 = sra_bytes(r3, sh, sh8);
    }
    __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
    __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
    _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi16(t0, t2));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm_unpackhi_epi16(t0, t2));
    _mm_storeu_si128((__m128i *)(dst + 32), _mm_unpacklo_epi16(t1, t3));
    _mm_storeu_si128((__m128i *)(dst + 48), _mm_unpackhi_epi16(t1, t3));
}

MPL_TARGET_AVX2 static void pack_b_simd(const int8_t *Y, size_t k, size_t n, int shift, int8_t *out)
{
    size_t nq = (k + 3) / 4, npanel = (n + V_PANEL - 1) / V_PANEL;
    for (size_t pn = 0; pn < npanel; ++pn) {
        size_t j0 = pn * V_PANEL;
        int8_t *dst = out + pn * nq * V_QBYTES;
        for (size_t q = 0; q < nq; ++q, dst += V_QBYTES) {
            if (j0 + V_PANEL <= n && 4 * q + 4 <= k) {
                const int8_t *s = Y + 4 * q * n + j0;
                for (int g = 0; g < 4; ++g)
                    interleave4x16(s + 16 * g, n, shift, dst + 64 * g);
            } else {
                pack_quad_c(Y, k, n, q, j0, shift, dst);
            }
        }
    }
}
#endif

void mpl_vnni_pack_b(const int8_t *Y, size_t k, size_t n, int shift, int8_t *out)
{
#if MPL_X86
    if (mpl_cpu_avx2()) {
        pack_b_simd(Y, k, n, shift, out);
        return;
    }
#endif
    size_t nq = (k + 3) / 4, npanel = (n + V_PANEL - 1) / V_PANEL;
    for (size_t pn = 0; pn < npanel; ++pn)
        for (size_t q = 0; q < nq; ++q)
            pack_quad_c(Y, k, n, q, pn * V_PANEL, shift, out + (pn * nq + q) * V_QBYTES);
}

/* Portable product on packed Y (reference for tests and CPUs without VNNI):
 * the same int32 k blocks as the SIMD paths. */
#define V_KC_MAX 65536 /* k per int32 block: <= 16448 quads, see the top */

static inline void add_weighted(int64_t *c, int64_t weight, int64_t v)
{
    *c = (int64_t)((uint64_t)*c + (uint64_t)weight * (uint64_t)v);
}

int mpl_vnni_gemm_c(const uint8_t *X, const int8_t *Bp, size_t m, size_t k, size_t n,
                    int64_t *C, ptrdiff_t ldc, int64_t weight, const mpl_gemm_start *start)
{
    size_t nq = (k + 3) / 4;
    if (start)
        mpl_gemm_start_fill(start, C, ldc, m, n);
    int32_t acc[V_PANEL];
    for (size_t i = 0; i < m; ++i) {
        const uint8_t *x = X + i * k;
        for (size_t j0 = 0; j0 < n; j0 += V_PANEL) {
            const int8_t *panel = Bp + (j0 / V_PANEL) * nq * V_QBYTES;
            size_t cols = n - j0 < V_PANEL ? n - j0 : V_PANEL;
            for (size_t p0 = 0; p0 < k; p0 += V_KC_MAX) {
                size_t p1 = k - p0 < V_KC_MAX ? k : p0 + V_KC_MAX;
                memset(acc, 0, sizeof acc);
                for (size_t p = p0; p < p1; ++p) {
                    int32_t xv = x[p];
                    const int8_t *row = panel + (p / 4) * V_QBYTES + (p % 4);
                    for (size_t c = 0; c < cols; ++c)
                        acc[c] += xv * (int32_t)row[4 * c];
                }
                for (size_t c = 0; c < cols; ++c)
                    add_weighted(&C[(ptrdiff_t)i * ldc + (ptrdiff_t)(j0 + c)], weight, acc[c]);
            }
        }
    }
    return 0;
}

#if MPL_X86
/* Blocking.  C is int64 and large, so it must not be reread for every k
 * block: for a block of V_MC rows and one 64-column panel, the int32 sums
 * stay in a small scratch (V_MC x 64, in L1/L2) over all k blocks of a
 * super-block of up to V_KC_MAX k (the int32 bound above) and go to C once.
 * Within it, a panel's k block (V_KC*64 bytes = 32 KiB, held in L1) meets
 * all V_MR-row slivers of X, which stream from L2 (V_MC*V_KC bytes); X is
 * read in place with 4-byte broadcasts. */
#ifndef V_KC
#define V_KC 512 /* multiple of 4, <= V_KC_MAX */
#endif
#ifndef V_MC
#define V_MC 240 /* multiple of V_MR */
#endif
#define V_MR 6

static inline int32_t ld32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Pointers to the last, partial quad of each X row, zero-extended into xt. */
static void tail_rows(const uint8_t *const *xr, size_t nq, size_t kc, uint8_t xt[V_MR][4],
                      const uint8_t *xp[V_MR])
{
    for (int r = 0; r < V_MR; ++r) {
        memset(xt[r], 0, 4);
        memcpy(xt[r], xr[r] + 4 * nq, kc - 4 * nq);
        xp[r] = xt[r];
    }
}

/* c += vpdpbusd(a (u8), b (s8)) in place.  Written as asm: gcc 12 compiles
 * the intrinsics with a register copy and a spill per instruction. */
#define DPBUSD_Z(c, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b))
#define DPBUSD_YE(c, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b))
#define DPBUSD_YV(c, a, b) __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(c) : "x"(a), "x"(b))

/* ----------------------------------------------------- zmm micro-tile --- */
/* 6 rows x 64 columns: 24 zmm int32 accumulators, 4 zmm of Y per quad, one
 * broadcast of X.  Named accumulators (arrays made gcc spill). */
#define Z_ROW(r)                                                                        \
    do {                                                                                \
        __m512i a_ = _mm512_set1_epi32(ld32(x##r + 4 * q));                             \
        DPBUSD_Z(c##r##0, a_, b0);                                                      \
        DPBUSD_Z(c##r##1, a_, b1);                                                      \
        DPBUSD_Z(c##r##2, a_, b2);                                                      \
        DPBUSD_Z(c##r##3, a_, b3);                                                      \
    } while (0)
#define Z_OUT1(r, v)                                                                    \
    _mm512_storeu_si512((void *)(acc + V_PANEL * r + 16 * v),                           \
                        _mm512_add_epi32(c##r##v, _mm512_loadu_si512((const void *)(acc + V_PANEL * r + 16 * v))));
#define Z_OUT(r) Z_OUT1(r, 0) Z_OUT1(r, 1) Z_OUT1(r, 2) Z_OUT1(r, 3)

/* acc[r*64 + 0:64] += X[r, 0:4nq] @ Y-panel block (bq: its first quad), int32.
 * Only whole quads, and the sums leave the registers once, after the loop:
 * with a tail step or the C update in the same function gcc kept the
 * accumulators in memory inside the loop. */
MPL_TARGET_AVX512VNNI __attribute__((noinline)) static void
z_compute(const uint8_t *const *xr, size_t nq, const int8_t *bq, int32_t *acc)
{
    const uint8_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3], *x4 = xr[4], *x5 = xr[5];
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00,
            c12 = c00, c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00,
            c31 = c00, c32 = c00, c33 = c00, c40 = c00, c41 = c00, c42 = c00, c43 = c00,
            c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    for (size_t q = 0; q < nq; ++q, bq += V_QBYTES) {
        __m512i b0 = _mm512_loadu_si512((const void *)bq);
        __m512i b1 = _mm512_loadu_si512((const void *)(bq + 64));
        __m512i b2 = _mm512_loadu_si512((const void *)(bq + 128));
        __m512i b3 = _mm512_loadu_si512((const void *)(bq + 192));
        Z_ROW(0); Z_ROW(1); Z_ROW(2); Z_ROW(3); Z_ROW(4); Z_ROW(5);
    }
    Z_OUT(0) Z_OUT(1) Z_OUT(2) Z_OUT(3) Z_OUT(4) Z_OUT(5)
}

/* The zmm path's sliver step: all 64 columns (nr is not needed: padded
 * columns of Y are zero). */
MPL_TARGET_AVX512VNNI static void z_sliver(const uint8_t *const *xr, size_t nq,
                                           const int8_t *bq, int32_t *acc, int nr)
{
    (void)nr;
    z_compute(xr, nq, bq, acc);
}

/* c[0:16] = base + weight * acc (int32 lanes), nr < 16 columns masked; base: c itself, or
 * (a product's start) the start's values of these columns. */
MPL_TARGET_AVX512VNNI static void z_flush16(int64_t *c, const int32_t *acc, int nr, int64_t weight,
                                            const int64_t *base)
{
    if (nr <= 0)
        return;
    const int64_t *from = base ? base : c;
    if (weight < INT32_MIN || weight > INT32_MAX) {
        for (int j = 0; j < nr && j < 16; ++j)
            c[j] = (int64_t)((uint64_t)from[j] + (uint64_t)weight * (uint64_t)(int64_t)acc[j]);
        return;
    }
    const __m512i w = _mm512_set1_epi64(weight);
    __m512i lo = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)acc));
    __m512i hi = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(acc + 8)));
    __mmask8 mlo = nr >= 8 ? 0xff : (__mmask8)((1u << nr) - 1);
    __mmask8 mhi = nr >= 16 ? 0xff : nr <= 8 ? 0 : (__mmask8)((1u << (nr - 8)) - 1);
    __m512i c0 = _mm512_maskz_loadu_epi64(mlo, from), c1 = _mm512_maskz_loadu_epi64(mhi, from + 8);
    /* vpmuldq: exact int64 product of the sign-extended int32 lanes and weight */
    _mm512_mask_storeu_epi64(c, mlo, _mm512_add_epi64(c0, _mm512_mul_epi32(lo, w)));
    _mm512_mask_storeu_epi64(c + 8, mhi, _mm512_add_epi64(c1, _mm512_mul_epi32(hi, w)));
}

/* st: the start at this block's first row and column, or NULL to accumulate. */
MPL_TARGET_AVX512VNNI static void z_flush(int64_t *C, ptrdiff_t ldc, const int32_t *acc,
                                          size_t rows, int nr, int64_t weight, const mpl_gemm_start *st)
{
    int64_t base[V_PANEL];
    for (size_t r = 0; r < rows; ++r) {
        if (st) {
            /* C is written, not read: fetch its lines for writing while the start is computed
             * (stores that miss stall the flush otherwise; an accumulating flush loads them) */
            for (int t = 0; t < nr; t += 8)
                __builtin_prefetch(C + (ptrdiff_t)r * ldc + t, 1, 3);
            mpl_gemm_start_row(st, r, 0, (size_t)nr, base);
        }
        for (int g = 0; g < 4; ++g)
            z_flush16(C + (ptrdiff_t)r * ldc + 16 * g, acc + V_PANEL * r + 16 * g, nr - 16 * g, weight,
                      st ? base + 16 * g : NULL);
    }
}

/* ----------------------------------------------------- ymm micro-tile --- */
/* 6 rows x 16 columns (the 16-column group g of a 64-column panel): 12 ymm
 * accumulators + 2 of Y + 1 broadcast fit the 16 VEX registers.  The body is
 * instantiated with the VEX (AVX-VNNI) and the EVEX (AVX512-VNNI+VL) vpdpbusd. */
#define Y_ROW(r)                                                                        \
    do {                                                                                \
        __m256i a_ = _mm256_set1_epi32(ld32(x##r + 4 * q));                             \
        DPBUSD(c##r##0, a_, b0);                                                        \
        DPBUSD(c##r##1, a_, b1);                                                        \
    } while (0)
#define Y_OUT1(r, v)                                                                    \
    _mm256_storeu_si256((__m256i *)(acc + V_PANEL * r + 8 * v),                         \
                        _mm256_add_epi32(c##r##v, _mm256_loadu_si256((const __m256i *)(acc + V_PANEL * r + 8 * v))));
#define Y_OUT(r) Y_OUT1(r, 0) Y_OUT1(r, 1)

/* NAME_compute: acc[r*64 + 0:16] += X[r, 0:4nq] @ one 16-column group;
 * NAME: the sliver step over the groups that hold real columns. */
#define Y_SLIVER_FN(NAME, TARGET)                                                       \
    TARGET __attribute__((noinline)) static void                                        \
    NAME##_compute(const uint8_t *const *xr, size_t nq, const int8_t *bq, int32_t *acc) \
    {                                                                                   \
        const uint8_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3], *x4 = xr[4],  \
                      *x5 = xr[5];                                                      \
        __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00,          \
                c20 = c00, c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00,       \
                c50 = c00, c51 = c00;                                                   \
        for (size_t q = 0; q < nq; ++q, bq += V_QBYTES) {                               \
            __m256i b0 = _mm256_loadu_si256((const __m256i *)bq);                       \
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(bq + 32));                \
            Y_ROW(0); Y_ROW(1); Y_ROW(2); Y_ROW(3); Y_ROW(4); Y_ROW(5);                 \
        }                                                                               \
        Y_OUT(0) Y_OUT(1) Y_OUT(2) Y_OUT(3) Y_OUT(4) Y_OUT(5)                           \
    }                                                                                   \
    TARGET static void NAME(const uint8_t *const *xr, size_t nq, const int8_t *bq,      \
                            int32_t *acc, int nr)                                       \
    {                                                                                   \
        for (int g = 0; g < 4 && 16 * g < nr; ++g)                                      \
            NAME##_compute(xr, nq, bq + 64 * g, acc + 16 * g);                          \
    }

#define DPBUSD DPBUSD_YE
Y_SLIVER_FN(y_sliver_evex, MPL_TARGET_AVX512VNNI)
#undef DPBUSD
#if MPL_HAVE_AVXVNNI
#define DPBUSD DPBUSD_YV
Y_SLIVER_FN(y_sliver_vex, MPL_TARGET_AVXVNNI)
#undef DPBUSD
#endif

/* C[0:rows, 0:nr] = base + weight * acc (row stride 64), AVX2: the ymm paths' flush (base as
 * in z_flush). */
MPL_TARGET_AVX2 static void y_flush(int64_t *C, ptrdiff_t ldc, const int32_t *acc,
                                    size_t rows, int nr, int64_t weight, const mpl_gemm_start *st)
{
    int wide = weight >= INT32_MIN && weight <= INT32_MAX;
    const __m256i w = _mm256_set1_epi64x(weight);
    int64_t base[V_PANEL];
    for (size_t r = 0; r < rows; ++r) {
        int64_t *c = C + (ptrdiff_t)r * ldc;
        const int32_t *a = acc + V_PANEL * r;
        if (st) {  /* as in z_flush: C's lines fetched for writing first */
            for (int t = 0; t < nr; t += 8)
                __builtin_prefetch(c + t, 1, 3);
            mpl_gemm_start_row(st, r, 0, (size_t)nr, base);
        }
        const int64_t *from = st ? base : c;
        int j = 0;
        for (; wide && j + 4 <= nr; j += 4) { /* vpmuldq: exact int32 x int32 -> int64 */
            __m256i v = _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(a + j)));
            __m256i cv = _mm256_loadu_si256((const __m256i *)(from + j));
            _mm256_storeu_si256((__m256i *)(c + j), _mm256_add_epi64(cv, _mm256_mul_epi32(v, w)));
        }
        for (; j < nr; ++j)
            c[j] = (int64_t)((uint64_t)from[j] + (uint64_t)weight * (uint64_t)(int64_t)a[j]);
    }
}

typedef void (*v_sliver_fn)(const uint8_t *const *, size_t, const int8_t *, int32_t *, int);
typedef void (*v_flush_fn)(int64_t *, ptrdiff_t, const int32_t *, size_t, int, int64_t, const mpl_gemm_start *);

/* The start at row i0, column j0. */
static mpl_gemm_start start_at(const mpl_gemm_start *st, size_t i0, size_t j0)
{
    mpl_gemm_start out = *st;
    if (out.src)
        out.src += (ptrdiff_t)i0 * out.ld_src + (ptrdiff_t)j0;
    if (out.row)
        out.row += i0;
    if (out.col)
        out.col += j0;
    for (int t = 0; t < 2; ++t) {
        if (out.u[t])
            out.u[t] += i0;
        if (out.v[t])
            out.v[t] += j0;
    }
    return out;
}

/* acc (6 x 64, row stride 64) += X sliver [0:kc] @ panel block, k tail included. */
static void v_sliver_block(v_sliver_fn sliver, const uint8_t *const *xr, size_t kc,
                           const int8_t *bq, int32_t *acc, int nr)
{
    size_t nq = kc / 4;
    sliver(xr, nq, bq, acc, nr);
    if (4 * nq < kc) { /* k tail: X's last quad zero-extended (Y's is zero-padded) */
        uint8_t xt[V_MR][4];
        const uint8_t *xp[V_MR];
        tail_rows(xr, nq, kc, xt, xp);
        sliver(xp, 1, bq + nq * V_QBYTES, acc, nr);
    }
}

/* With a start, the first super-block of k writes C (the later ones add to it). With an
 * estimate (k in one super-block), each block is flushed into a scratch tile whose rows the
 * estimate pass turns into C's (the estimate instead of the product: one pass over C). */
static int vnni_driver(const uint8_t *X, const int8_t *Bp, size_t m, size_t k, size_t n,
                       int64_t *C, ptrdiff_t ldc, int64_t weight, v_sliver_fn sliver,
                       v_flush_fn flush, const mpl_gemm_start *start, mpl_estimate_ctx *est)
{
    int32_t *acc = (int32_t *)aligned_alloc(64, (size_t)V_MC * V_PANEL * sizeof(int32_t));
    int64_t *tile = est ? (int64_t *)aligned_alloc(64, (size_t)V_MC * V_PANEL * sizeof(int64_t)) : NULL;
    if (!acc || (est && !tile)) {
        free(acc);
        free(tile);
        return -1;
    }
    size_t nq = (k + 3) / 4, npanel = (n + V_PANEL - 1) / V_PANEL;
    for (size_t s0 = 0; s0 < k; s0 += V_KC_MAX) { /* int32-exact super-blocks of k */
        size_t s1 = k - s0 < V_KC_MAX ? k : s0 + V_KC_MAX;
        for (size_t i0 = 0; i0 < m; i0 += V_MC) {
            size_t mc = m - i0 < V_MC ? m - i0 : V_MC;
            for (size_t pn = 0; pn < npanel; ++pn) {
                size_t j0 = pn * V_PANEL;
                int nr = n - j0 < V_PANEL ? (int)(n - j0) : V_PANEL;
                memset(acc, 0, ((mc + V_MR - 1) / V_MR) * V_MR * V_PANEL * sizeof(int32_t));
                for (size_t p0 = s0; p0 < s1; p0 += V_KC) {
                    size_t kc = s1 - p0 < V_KC ? s1 - p0 : V_KC;
                    const int8_t *bq = Bp + (pn * nq + p0 / 4) * V_QBYTES;
                    for (size_t ir = 0; ir < mc; ir += V_MR) {
                        const uint8_t *xr[V_MR];
                        for (size_t a = 0; a < V_MR; ++a) /* missing rows: reread the first, unused */
                            xr[a] = X + (i0 + ir + (ir + a < mc ? a : 0)) * k + p0;
                        v_sliver_block(sliver, xr, kc, bq, acc + ir * V_PANEL, nr);
                    }
                }
                mpl_gemm_start st;
                if (start && s0 == 0)
                    st = start_at(start, i0, j0);
                int64_t *c0 = C + (ptrdiff_t)i0 * ldc + (ptrdiff_t)j0;
                if (!tile) {
                    flush(c0, ldc, acc, mc, nr, weight, start && s0 == 0 ? &st : NULL);
                    continue;
                }
                if (!start) /* the flush adds to what its destination holds */
                    for (size_t r = 0; r < mc; ++r)
                        memcpy(tile + r * V_PANEL, c0 + (ptrdiff_t)r * ldc, (size_t)nr * sizeof(int64_t));
                flush(tile, V_PANEL, acc, mc, nr, weight, start ? &st : NULL);
                for (size_t r = 0; r < mc; ++r) {
                    /* C's lines fetched for writing a few rows ahead: the estimate's stores that miss
                     * stall it otherwise (as z_flush's would) */
                    if (r + 3 < mc)
                        for (int t = 0; t < nr; t += 8)
                            __builtin_prefetch(c0 + (ptrdiff_t)(r + 3) * ldc + t, 1, 3);
                    mpl_estimate_block(est, i0 + r, j0, (size_t)nr, tile + r * V_PANEL, c0 + (ptrdiff_t)r * ldc);
                }
            }
        }
    }
    free(acc);
    free(tile);
    return 0;
}
#endif

static int vnni_product(const uint8_t *X, const int8_t *Bp, size_t m, size_t k, size_t n,
                        int64_t *C, ptrdiff_t ldc, int64_t weight, int isa, const mpl_gemm_start *start,
                        mpl_estimate_ctx *est)
{
    if (k == 0) {
        if (start)
            mpl_gemm_start_fill(start, C, ldc, m, n);
        return 0;
    }
#if MPL_X86
    if (isa == MPL_VNNI_ZMM && mpl_cpu_avx512vnni())
        return vnni_driver(X, Bp, m, k, n, C, ldc, weight, z_sliver, z_flush, start, est);
    if (isa == MPL_VNNI_YMM_EVEX && mpl_cpu_avx512vnni())
        return vnni_driver(X, Bp, m, k, n, C, ldc, weight, y_sliver_evex, y_flush, start, est);
#if MPL_HAVE_AVXVNNI
    if (isa == MPL_VNNI_YMM_VEX && mpl_cpu_avxvnni())
        return vnni_driver(X, Bp, m, k, n, C, ldc, weight, y_sliver_vex, y_flush, start, est);
#endif
#endif
    (void)est;
    if (isa != MPL_VNNI_PORTABLE)
        return -2; /* the caller asked for a path this CPU lacks */
    return mpl_vnni_gemm_c(X, Bp, m, k, n, C, ldc, weight, start);
}

int mpl_vnni_gemm_acc(const uint8_t *X, const int8_t *Bp, size_t m, size_t k, size_t n,
                      int64_t *C, ptrdiff_t ldc, int64_t weight, int isa, const mpl_gemm_start *start,
                      mpl_estimate_ctx *est)
{
    if (m == 0 || n == 0)
        return 0;
    /* in the flush when k is one int32 super-block on a SIMD path; else a pass after the product */
    int fused = est && k > 0 && k <= V_KC_MAX && isa != MPL_VNNI_PORTABLE;
    int rc = vnni_product(X, Bp, m, k, n, C, ldc, weight, isa, start, fused ? est : NULL);
    if (rc == 0 && est && !fused)
        mpl_estimate_rows(est, 0, 0, C, ldc, C, ldc, m, n); /* the pass after the product, in place */
    return rc;
}
