# cython: language_level=3
"""The BLAS path of the exact int8 product: float32 sgemm on k-blocks where every
partial sum is an exact integer. A module of its own because cimporting
scipy.linalg.cython_blas imports scipy.linalg (~0.2 s per rank at start-up), which
AVX2 machines, using the SIMD kernel, never need.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int8_t, int64_t, uint8_t
from libc.stdlib cimport free, malloc
from scipy.linalg.cython_blas cimport sgemm

cnp.import_array()

cdef extern from "int8_gemm.h":
    void mpl_u8_block_to_f32(const uint8_t *X, size_t ldx, size_t rows, size_t cols,
                             float *out) nogil
    void mpl_s8_block_to_f32(const int8_t *Y, size_t ldy, size_t rows, size_t cols,
                             float *out) nogil
    void mpl_acc_f32_block(int64_t *C, ptrdiff_t ldc, const float *Cf, size_t rows,
                           size_t cols, int64_t weight) nogil


# k block of the BLAS path: |x*y| <= 127*128 = 16256 and at most 1024 terms,
# so every partial sum, in any order, is an integer of magnitude
# <= 1024*16256 = 16,646,144 < 2**24 and is exact in float32.
cdef enum:
    BLAS_KB = 1024
    BLAS_NB = 8192
    BLAS_ELEMS = 1 << 22


cdef int _int8_blas(const uint8_t *X, const int8_t *Y, int m, int k, int n,
                    int64_t *C, ptrdiff_t ldc, int64_t weight) noexcept nogil:
    """C += weight * X @ Y through float32 sgemm on exact k blocks.

    Blocks: k <= BLAS_KB (exactness), columns <= BLAS_NB and rows so that
    the float32 copies stay within a few BLAS_ELEMS floats.
    """
    cdef int kb_max = k if k < BLAS_KB else BLAS_KB
    cdef int nb_max = n if n < BLAS_NB else BLAS_NB
    cdef int mb_max = BLAS_ELEMS // nb_max
    if mb_max < 64:
        mb_max = 64
    if mb_max > m:
        mb_max = m
    cdef float *Yf = <float *>malloc(<size_t>kb_max * nb_max * sizeof(float))
    cdef float *Xf = <float *>malloc(<size_t>mb_max * kb_max * sizeof(float))
    cdef float *Cf = <float *>malloc(<size_t>mb_max * nb_max * sizeof(float))
    cdef float one = 1.0, zero = 0.0
    cdef char trans = b'N'
    cdef int p0, i0, j0, kb, mb, nb
    if Yf == NULL or Xf == NULL or Cf == NULL:
        free(Yf); free(Xf); free(Cf)
        return -1
    j0 = 0
    while j0 < n:
        nb = n - j0 if n - j0 < nb_max else nb_max
        p0 = 0
        while p0 < k:
            kb = k - p0 if k - p0 < BLAS_KB else BLAS_KB
            mpl_s8_block_to_f32(Y + <size_t>p0 * n + j0, n, kb, nb, Yf)
            i0 = 0
            while i0 < m:
                mb = m - i0 if m - i0 < mb_max else mb_max
                mpl_u8_block_to_f32(X + <size_t>i0 * k + p0, k, mb, kb, Xf)
                # row-major Cf[mb, nb] = Xf[mb, kb] @ Yf[kb, nb] is column-major
                # Cf^T = Yf^T @ Xf^T: Fortran sgemm with the operands swapped.
                sgemm(&trans, &trans, &nb, &mb, &kb, &one, Yf, &nb, Xf, &kb, &zero, Cf, &nb)
                mpl_acc_f32_block(C + i0 * ldc + j0, ldc, Cf, mb, nb, weight)
                i0 += mb
            p0 += kb
        j0 += nb
    free(Yf); free(Xf); free(Cf)
    return 0



def int8_matmul_blas_acc(X, Y, C, long long weight):
    """C += weight * (X @ Y) through sgemm; arguments already checked by
    mpilayer._kernels.int8_matmul_acc (uint8 X <= 127, int8 Y, int64 C with unit
    column stride)."""
    cdef Py_ssize_t m = X.shape[0], k = X.shape[1], n = Y.shape[1]
    if max(m, n, k) > 2**31 - 1:
        raise ValueError("matrix too large for the BLAS path (32-bit BLAS integers)")
    cdef const uint8_t[:, ::1] xv = X
    cdef const int8_t[:, ::1] yv = Y
    cdef int64_t[:, :] cv = C
    cdef int rc
    with nogil:
        rc = _int8_blas(&xv[0, 0], &yv[0, 0], <int>m, <int>k, <int>n, &cv[0, 0], cv.strides[0] // 8, weight)
    if rc != 0:
        raise MemoryError("int8_matmul_acc: could not allocate work buffers")
