/* Exact u8 x s8 -> int64 matrix products (see int8_gemm.c). */
#ifndef MPILAYER_INT8_GEMM_H
#define MPILAYER_INT8_GEMM_H

#include <stddef.h>
#include <stdint.h>

/* C[i*ldc + j] += weight * sum_p X[i*k+p] * Y[p*n+j]   (mod 2^64).
 * X values must lie in [0, x_max] (not checked): x_max <= 127 for the AVX2
 * path (vpmaddubsw saturates beyond), any uint8 for the plain C one.
 * Returns 0, or -1 if a work buffer could not be allocated. */
int mpl_int8_gemm_acc_c(const uint8_t *X, const int8_t *Y, size_t m, size_t k, size_t n,
                        int64_t *C, ptrdiff_t ldc, int64_t weight);
int mpl_int8_gemm_acc_avx2(const uint8_t *X, const int8_t *Y, size_t m, size_t k, size_t n,
                           int64_t *C, ptrdiff_t ldc, int64_t weight, int x_max);

/* The start of a product that writes C instead of adding to it (saves a pass over C):
 *     C[i, j] = src[i, j] + row[i] + col[j] + u[0][i] v[0][j] + u[1][i] v[1][j]
 *               + weight * (X @ Y)[i, j]   (mod 2^64),
 * each term optional (NULL: 0; a rank-one term needs both u[t] and v[t]); src (row stride
 * ld_src) may be C itself. mpl_gemm_start_row writes one row's start values (columns j0..j0+nr
 * of row i); mpl_gemm_start_fill writes the start of every element (for the paths that only
 * accumulate). */
typedef struct {
    const int64_t *src;
    ptrdiff_t ld_src;
    const int64_t *row, *col;
    const int64_t *u[2], *v[2];
} mpl_gemm_start;
void mpl_gemm_start_fill(const mpl_gemm_start *start, int64_t *C, ptrdiff_t ldc, size_t m, size_t n);

/* Inline, so that each caller compiles it for its own target (the VNNI flush: AVX-512). */
static inline void mpl_gemm_start_row(const mpl_gemm_start *start, size_t i, size_t j0, size_t nr, int64_t *out)
{
    const int64_t *s = start->src ? start->src + (ptrdiff_t)i * start->ld_src + j0 : NULL;
    const int64_t *col = start->col ? start->col + j0 : NULL;
    const uint64_t r = start->row ? (uint64_t)start->row[i] : 0;
    for (size_t j = 0; j < nr; ++j)
        out[j] = (int64_t)((s ? (uint64_t)s[j] : 0) + r + (col ? (uint64_t)col[j] : 0));
    for (int t = 0; t < 2; ++t) {
        if (!start->u[t] || !start->v[t])
            continue;
        const uint64_t u = (uint64_t)start->u[t][i];
        const int64_t *v = start->v[t] + j0;
        for (size_t j = 0; j < nr; ++j)
            out[j] = (int64_t)((uint64_t)out[j] + u * (uint64_t)v[j]);
    }
}

/* Helpers of the BLAS (sgemm) path. */
void mpl_u8_block_to_f32(const uint8_t *X, size_t ldx, size_t rows, size_t cols, float *out);
void mpl_s8_block_to_f32(const int8_t *Y, size_t ldy, size_t rows, size_t cols, float *out);
void mpl_acc_f32_block(int64_t *C, ptrdiff_t ldc, const float *Cf, size_t rows, size_t cols,
                       int64_t weight);

/* VNNI paths (vnni_gemm.c): Y packed once by mpl_vnni_pack_b into
 * mpl_vnni_packed_size(k, n) bytes; X may hold any uint8 (0..255). */
#define MPL_VNNI_PORTABLE 0 /* plain C on the packed layout */
#define MPL_VNNI_ZMM 1      /* AVX512-VNNI, zmm */
#define MPL_VNNI_YMM_VEX 2  /* AVX-VNNI, ymm */
#define MPL_VNNI_YMM_EVEX 3 /* AVX512-VNNI + VL, ymm (the ymm body on AVX-512 CPUs) */
size_t mpl_vnni_packed_size(size_t k, size_t n);
void mpl_vnni_pack_b(const int8_t *Y, size_t k, size_t n, int shift, int8_t *out); /* Y >> shift, 0 <= shift < 8 */
/* C += weight * (X @ Y), or with `start` (not NULL) C = start + weight * (X @ Y), written
 * in the same pass (C is not read unless start->src is C). With `est` (not NULL, from
 * mpl_estimate_begin, estimates.h), C receives the estimate of that result instead (int64 for
 * integers, else float64 in C's memory), bit for bit that of mpl_estimate_fast over it: in the
 * same pass on the SIMD paths for k <= 65536, else in a pass after the product.
 * Returns 0, -1 if a work buffer could not be allocated, or -2 if `isa` is not supported by
 * this CPU/build. */
struct mpl_estimate_ctx;
int mpl_vnni_gemm_acc(const uint8_t *X, const int8_t *Bp, size_t m, size_t k, size_t n,
                      int64_t *C, ptrdiff_t ldc, int64_t weight, int isa, const mpl_gemm_start *start,
                      struct mpl_estimate_ctx *est);

#endif
