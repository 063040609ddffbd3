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
void mpl_vnni_pack_b(const int8_t *Y, size_t k, size_t n, int8_t *out);
/* Returns 0, or -2 if `isa` is not supported by this CPU/build. */
int mpl_vnni_gemm_acc(const uint8_t *X, const int8_t *Bp, size_t m, size_t k, size_t n,
                      int64_t *C, ptrdiff_t ldc, int64_t weight, int isa);

#endif
