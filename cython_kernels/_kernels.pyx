# cython: language_level=3
"""Compiled kernels of mpilayer: bit-plane packing, popcount and int8 GEMM.

All compute runs single-threaded in C with the GIL released; arguments are
validated here, with the GIL held, so that the C code can trust them.  SIMD
(AVX2) bodies are chosen at run time, so the module runs on any x86-64 and
builds on other architectures (where the portable C / BLAS paths are used).

Integer accumulation into C is exact as long as the true result fits in
int64; beyond that it wraps modulo 2**64 (like numpy int64), never UB.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int8_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc

cnp.import_array()


cdef extern from "cpu_dispatch.h":
    int MPL_X86
    int mpl_cpu_avx2() nogil
    int mpl_cpu_popcnt() nogil

cdef extern from "bitplanes.h":
    int MPL_METHOD_C
    int MPL_METHOD_AVX2
    size_t mpl_plane_words(size_t k) nogil
    void mpl_pack_rows(const void *X, int elsize, size_t m, size_t k, int low_bit,
                       int n_planes, uint64_t *out, size_t W, int method) nogil
    void mpl_pack_cols(const void *Y, int elsize, size_t k, size_t n, int low_bit,
                       int n_planes, uint64_t *out, size_t W, int method) nogil
    void mpl_popcount_matmul_acc(const uint64_t *X, size_t m, const uint64_t *Y, size_t n,
                                 size_t W, int64_t *C, ptrdiff_t ldc, int64_t weight,
                                 int method) nogil

cdef extern from "int8_gemm.h":
    int mpl_int8_gemm_acc_c(const uint8_t *X, const int8_t *Y, size_t m, size_t k, size_t n,
                            int64_t *C, ptrdiff_t ldc, int64_t weight) nogil
    int mpl_int8_gemm_acc_avx2(const uint8_t *X, const int8_t *Y, size_t m, size_t k,
                               size_t n, int64_t *C, ptrdiff_t ldc, int64_t weight,
                               int x_max) nogil


# --------------------------------------------------------------- helpers ---

def cpu_features():
    """Features the running CPU offers to these kernels (runtime-detected)."""
    return {
        "simd_compiled": bool(MPL_X86),  # False: built without x86 SIMD paths
        "avx2": bool(mpl_cpu_avx2()),
        "popcnt": bool(mpl_cpu_popcnt()),
    }


cdef _require(name, a, dtypes, bint contiguous=True):
    """Check that `a` is a 2-D numpy array of one of `dtypes`."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in dtypes:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


cdef _require_out(C, Py_ssize_t m, Py_ssize_t n):
    """C: writable int64 [m, n] with unit column stride (any row stride)."""
    _require("C", C, (np.int64,), contiguous=False)
    if C.shape != (m, n):
        raise ValueError(f"C must have shape {(m, n)}, got {C.shape}")
    if not C.flags.writeable:
        raise ValueError("C must be writeable")
    if m > 0 and n > 1 and C.strides[1] != 8:
        raise ValueError(f"C must have unit stride along columns (strides[1] == 8), "
                         f"got strides {C.strides}")
    if m > 1 and C.strides[0] % 8 != 0:
        raise ValueError(f"C's row stride must be a multiple of 8 bytes, got {C.strides[0]}")


cdef int _method_code(method, bint has_blas) except -1:
    """'auto' -> 1 (avx2) or 0 (c, or 2 = blas when has_blas)."""
    if method == "auto":
        if mpl_cpu_avx2():
            return 1
        return 2 if has_blas else 0
    if method == "avx2":
        if not mpl_cpu_avx2():
            raise ValueError("method='avx2' requested but this CPU has no AVX2")
        return 1
    if method == "c":
        return 0
    if has_blas and method == "blas":
        return 2
    allowed = "'auto', 'avx2', 'blas' or 'c'" if has_blas else "'auto', 'avx2' or 'c'"
    raise ValueError(f"method must be {allowed}, got {method!r}")


# --------------------------------------------------------------- packing ---

def plane_words(Py_ssize_t k):
    """uint64 words per packed row of length k.

    ceil(k/64) rounded up to a multiple of 4 (one AVX2 vector, so kernels have
    no word tail), plus 4 when the row stride would be a multiple of 4 KiB
    (L1 set aliasing).  Padding words are zero, so they add nothing to a
    popcount dot product.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return mpl_plane_words(<size_t>k)


cdef _check_planes(a, int low_bit, int n_planes):
    cdef int bits = 8 * a.dtype.itemsize
    if n_planes < 0 or low_bit < 0 or low_bit + n_planes > bits:
        raise ValueError(f"need 0 <= low_bit and 0 <= n_planes with low_bit + n_planes <= "
                         f"{bits} for {a.dtype}, got low_bit={low_bit}, n_planes={n_planes}")


def pack_row_planes(X, int low_bit, int n_planes):
    """Bit planes low_bit..low_bit+n_planes-1 of X's rows, packed along k.

    X: C-contiguous int8/int16 [m, k].  Returns uint64 [n_planes, m, W] with
    W = plane_words(k); bit t of word w of out[p, i] is bit (low_bit + p) of
    X[i, 64*w + t] (two's complement).  One pass over X for all planes.
    """
    return _pack_planes("X", X, low_bit, n_planes, False)


def pack_col_planes(Y, int low_bit, int n_planes):
    """Bit planes of Y's columns, packed along k (a bit transpose).

    Y: C-contiguous int8/int16 [k, n].  Returns uint64 [n_planes, n, W] with
    bit t of word w of out[p, j] = bit (low_bit + p) of Y[64*w + t, j];
    Y.T is never materialised.
    """
    return _pack_planes("Y", Y, low_bit, n_planes, True)


cdef _pack_planes(name, A, int low_bit, int n_planes, bint columns):
    """Shared body of the two packers: checks, output allocation, the C call."""
    _require(name, A, (np.int8, np.int16))
    _check_planes(A, low_bit, n_planes)
    cdef size_t rows = A.shape[0], cols = A.shape[1]
    cdef size_t k = rows if columns else cols
    cdef size_t W = mpl_plane_words(k)
    cdef int elsize = A.dtype.itemsize
    out = np.empty((n_planes, cols if columns else rows, W), dtype=np.uint64)
    if out.size == 0:
        return out
    cdef const void *src = cnp.PyArray_DATA(A)
    cdef uint64_t *dst = <uint64_t *>cnp.PyArray_DATA(out)
    cdef int method = MPL_METHOD_AVX2 if mpl_cpu_avx2() else MPL_METHOD_C
    with nogil:
        if columns:
            mpl_pack_cols(src, elsize, rows, cols, low_bit, n_planes, dst, W, method)
        else:
            mpl_pack_rows(src, elsize, rows, cols, low_bit, n_planes, dst, W, method)
    return out


# -------------------------------------------------------------- products ---

def popcount_matmul_acc(Xp, Yp, C, long long weight, method="auto"):
    """C[i, j] += weight * sum_w popcount(Xp[i, w] & Yp[j, w]).

    Xp: uint64 [m, W], Yp: uint64 [n, W] (C-contiguous, e.g. packed[p]);
    C: int64 [m, n], unit column stride, any row stride (may be a view).
    method: 'auto' (AVX2 if available, else C), 'avx2' or 'c'.
    """
    _require("Xp", Xp, (np.uint64,))
    _require("Yp", Yp, (np.uint64,))
    if Xp.shape[1] != Yp.shape[1]:
        raise ValueError(f"Xp and Yp must have the same number of words, got "
                         f"{Xp.shape[1]} and {Yp.shape[1]}")
    cdef Py_ssize_t m = Xp.shape[0], n = Yp.shape[0], W = Xp.shape[1]
    _require_out(C, m, n)
    cdef int code = _method_code(method, False)
    if m == 0 or n == 0 or W == 0:
        return
    cdef const uint64_t[:, ::1] xv = Xp
    cdef const uint64_t[:, ::1] yv = Yp
    cdef int64_t[:, :] cv = C
    cdef int64_t *cptr = &cv[0, 0]
    cdef ptrdiff_t ldc = cv.strides[0] // 8
    cdef const uint64_t *xptr = &xv[0, 0]
    cdef const uint64_t *yptr = &yv[0, 0]
    cdef int cmethod = MPL_METHOD_AVX2 if code == 1 else MPL_METHOD_C
    with nogil:
        mpl_popcount_matmul_acc(xptr, m, yptr, n, W, cptr, ldc, weight, cmethod)


def int8_matmul_acc(X, Y, C, long long weight, int x_max=127, method="auto"):
    """C += weight * (X @ Y), exactly.

    X: C-contiguous uint8 [m, k] whose values all lie in [0, x_max]
    (x_max <= 127; the caller guarantees it, it is NOT checked -- larger
    values may give wrong results on the 'avx2' path).  Y: C-contiguous int8
    [k, n], any values.  C: int64 [m, n], unit column stride, any row stride.
    method: 'auto' (AVX2 if available, else BLAS), 'avx2', 'blas' or 'c'.
    A small x_max lets the AVX2 path accumulate in int16 (faster).
    """
    _require("X", X, (np.uint8,))
    _require("Y", Y, (np.int8,))
    if not 0 <= x_max <= 127:
        raise ValueError(f"x_max must be in [0, 127], got {x_max}")
    if X.shape[1] != Y.shape[0]:
        raise ValueError(f"inner dimensions differ: X is {X.shape}, Y is {Y.shape}")
    cdef Py_ssize_t m = X.shape[0], k = X.shape[1], n = Y.shape[1]
    _require_out(C, m, n)
    cdef int code = _method_code(method, True)
    if m == 0 or n == 0 or k == 0:
        return
    if code == 2:  # in its own module, so that only BLAS users pay for importing scipy.linalg
        from mpilayer import _blas_kernels
        return _blas_kernels.int8_matmul_blas_acc(X, Y, C, weight)
    cdef const uint8_t[:, ::1] xv = X
    cdef const int8_t[:, ::1] yv = Y
    cdef int64_t[:, :] cv = C
    cdef int64_t *cptr = &cv[0, 0]
    cdef ptrdiff_t ldc = cv.strides[0] // 8
    cdef const uint8_t *xptr = &xv[0, 0]
    cdef const int8_t *yptr = &yv[0, 0]
    cdef int rc
    with nogil:
        if code == 1:
            rc = mpl_int8_gemm_acc_avx2(xptr, yptr, m, k, n, cptr, ldc, weight, x_max)
        else:
            rc = mpl_int8_gemm_acc_c(xptr, yptr, m, k, n, cptr, ldc, weight)
    if rc != 0:
        raise MemoryError("int8_matmul_acc: could not allocate work buffers")
