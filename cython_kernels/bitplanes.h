/* Bit-plane packing and popcount matrix products (see bitplanes.c). */
#ifndef MPILAYER_BITPLANES_H
#define MPILAYER_BITPLANES_H

#include <stddef.h>
#include <stdint.h>

#define MPL_METHOD_C 0
#define MPL_METHOD_AVX2 1
#define MPL_METHOD_AVX512 2 /* popcount product only: AVX-512 VPOPCNTDQ, else AVX2 */

size_t mpl_plane_words(size_t k);

/* X: m x k row-major int8 (elsize 1) or int16 (elsize 2).
 * out: n_planes x m x W uint64; every word (padding included) is written. */
void mpl_pack_rows(const void *X, int elsize, size_t m, size_t k, int low_bit,
                   int n_planes, uint64_t *out, size_t W, int method);

/* Y: k x n row-major int8/int16.  out: n_planes x n x W (columns packed). */
void mpl_pack_cols(const void *Y, int elsize, size_t k, size_t n, int low_bit,
                   int n_planes, uint64_t *out, size_t W, int method);

/* C[i*ldc + j] += weight * sum_w popcount(X[i*W+w] & Y[j*W+w]) (mod 2^64). */
void mpl_popcount_matmul_acc(const uint64_t *X, size_t m, const uint64_t *Y,
                             size_t n, size_t W, int64_t *C, ptrdiff_t ldc,
                             int64_t weight, int method);

/* The same product (one pair of planes, the whole of k) written into C as its published
 * estimate (estimates.h's mpl_estimate_block over its row segments) instead of added to it: C's
 * old values are not read. Returns 0; -1 if out of memory; -2 (nothing written) where this path
 * does not do it (not AVX-512 VPOPCNTDQ, or W beyond one k block): the caller then fills C,
 * adds the product and runs the estimate pass over it. */
struct mpl_estimate_ctx;
int mpl_popcount_matmul_est(const uint64_t *X, size_t m, const uint64_t *Y, size_t n, size_t W,
                            int64_t *C, ptrdiff_t ldc, int64_t weight, int method,
                            struct mpl_estimate_ctx *est);

#endif
