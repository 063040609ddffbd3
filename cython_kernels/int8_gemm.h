/* Exact u8 x s8 -> int64 matrix products (see int8_gemm.c). */
#ifndef MPILAYER_INT8_GEMM_H
#define MPILAYER_INT8_GEMM_H

#include <stddef.h>
#include <stdint.h>

/* C[i*ldc + j] += weight * sum_p X[i*k+p] * Y[p*n+j]   (mod 2^64).
 * X values must lie in [0, x_max], x_max <= 127 (not checked).
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

#endif
