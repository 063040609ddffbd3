# cython: language_level=3
"""Compiled kernels of mpilayer: bit-plane packing, popcount and int8 GEMM.

All compute runs single-threaded in C with the GIL released; arguments are
validated here, with the GIL held, so that the C code can trust them.  SIMD
bodies (AVX2; AVX-512 VPOPCNTDQ for binary planes; AVX512-VNNI / AVX-VNNI for
full 8-bit digits) are chosen at run time, so the module runs on any x86-64
and builds on other architectures (where the portable C / BLAS paths are used).

Integer accumulation into C is exact as long as the true result fits in
int64; beyond that it wraps modulo 2**64 (like numpy int64), never UB.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int8_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc

from kernels_c cimport *  # the C functions and types (kernels_c.pxd)

cnp.import_array()


# --------------------------------------------------------------- helpers ---

def cpu_features():
    """Features the running CPU offers to these kernels (runtime-detected), and the
    paths ``method="auto"`` dispatches to."""
    return {
        "simd_compiled": bool(MPL_X86),  # False: built without x86 SIMD paths
        "avx2": bool(mpl_cpu_avx2()),
        "popcnt": bool(mpl_cpu_popcnt()),
        "avx512": bool(mpl_cpu_avx512()),  # F + BW + VL, zmm state saved by the OS
        "avx512_vpopcntdq": bool(mpl_cpu_vpopcntdq()),
        "avx512_vnni": bool(mpl_cpu_avx512vnni()),
        "avx_vnni": bool(mpl_cpu_avxvnni()),
        "avx_vnni_compiled": bool(MPL_HAVE_AVXVNNI),
        "popcount_path": _auto_popcount(),
        "int8_path": _auto_int8(127),
        "int8_path_8bit": _auto_int8(255),
    }


def popcount_methods():
    """Every popcount-product method this CPU runs, portable first."""
    out = ["c"]
    if mpl_cpu_avx2():
        out.append("avx2")
    if mpl_cpu_vpopcntdq():
        out.append("avx512")
    return out


def int8_methods():
    """Every int8-product method this CPU runs, portable first (blas: float32 sgemm)."""
    out = ["c", "blas"]
    if mpl_cpu_avx2():
        out.append("avx2")
    if mpl_cpu_avx512vnni():
        out += ["avx512vnni", "avx512vnni-ymm"]
    if mpl_cpu_avxvnni():
        out.append("avxvnni")
    return out


# methods that take any uint8 X (full 8-bit digits, x_max up to 255)
FULL_8BIT_METHODS = ("c", "avx512vnni", "avx512vnni-ymm", "avxvnni")


def _auto_popcount():
    if mpl_cpu_vpopcntdq():
        return "avx512"
    return "avx2" if mpl_cpu_avx2() else "c"


def _auto_int8(int x_max):
    """The fastest exact path for left digits up to x_max."""
    if mpl_cpu_avx512vnni():
        return "avx512vnni"
    if mpl_cpu_avxvnni():
        return "avxvnni"
    if x_max > 127:
        return "c"
    return "avx2" if mpl_cpu_avx2() else "blas"


_PEAKS = {"vnni512": MPL_PEAK_VNNI512, "popcnt512": MPL_PEAK_POPCNT512,
          "fma512": MPL_PEAK_FMA512, "maddubs256": MPL_PEAK_MADDUBS256,
          "popcnt256": MPL_PEAK_POPCNT256, "fma256": MPL_PEAK_FMA256,
          "avxvnni256": MPL_PEAK_AVXVNNI256}


def peak_loop(name, unsigned long long iters):
    """Run a register-only loop of one kernel's inner instructions (peaks.c) and return
    the MACs (bit-MACs for popcount) it did, 0 if this CPU lacks them.  Time it to get
    the instruction peak.  Names: vnni512, popcnt512, fma512, maddubs256, popcnt256,
    fma256, avxvnni256."""
    if name not in _PEAKS:
        raise ValueError(f"unknown peak loop {name!r}; expected one of {sorted(_PEAKS)}")
    cdef int which = _PEAKS[name]
    cdef uint64_t done
    if iters < 1:
        raise ValueError("iters must be >= 1")
    with nogil:
        done = mpl_peak_run(which, iters)
    return done


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

def popcount_matmul_acc(Xp, Yp, C, long long weight, method="auto", estimate=None):
    """C[i, j] += weight * sum_w popcount(Xp[i, w] & Yp[j, w]).

    Xp: uint64 [m, W], Yp: uint64 [n, W] (C-contiguous, e.g. packed[p]);
    C: int64 [m, n], unit column stride, any row stride (may be a view).
    method: 'auto' (AVX-512 VPOPCNTDQ, else AVX2, else C), 'avx512', 'avx2' or 'c'.
    ``estimate`` (as int8_matmul_acc's): C receives the published estimate of ``weight * (the
    product)`` instead (C's old values are not read), written by the AVX-512 and AVX2 paths in
    their pass over C when the planes are one k block (else a pass after the product); returns
    ``(bound, sum of squares, peak)``.
    """
    _require("Xp", Xp, (np.uint64,))
    _require("Yp", Yp, (np.uint64,))
    if Xp.shape[1] != Yp.shape[1]:
        raise ValueError(f"Xp and Yp must have the same number of words, got "
                         f"{Xp.shape[1]} and {Yp.shape[1]}")
    cdef Py_ssize_t m = Xp.shape[0], n = Yp.shape[0], W = Xp.shape[1]
    _require_out(C, m, n)
    if method == "auto":
        method = _auto_popcount()
    if method not in popcount_methods():
        raise ValueError(f"method must be 'auto' or one of {popcount_methods()} on this CPU, "
                         f"got {method!r}")
    if m == 0 or n == 0:
        return None if estimate is None else (0.0, 0.0, 0.0)
    cdef _Estimate est = None if estimate is None else _Estimate(estimate, m, n)
    if W == 0:
        if est is not None:
            C[...] = 0
            return est.finish(C)
        return
    cdef const uint64_t[:, ::1] xv = Xp
    cdef const uint64_t[:, ::1] yv = Yp
    cdef int64_t[:, :] cv = C
    cdef int64_t *cptr = &cv[0, 0]
    cdef ptrdiff_t ldc = cv.strides[0] // 8
    cdef const uint64_t *xptr = &xv[0, 0]
    cdef const uint64_t *yptr = &yv[0, 0]
    cdef int cmethod = (MPL_METHOD_AVX512 if method == "avx512" else
                        MPL_METHOD_AVX2 if method == "avx2" else MPL_METHOD_C)
    cdef int rc
    if est is not None:
        with nogil:
            rc = mpl_popcount_matmul_est(xptr, m, yptr, n, W, cptr, ldc, weight, cmethod, est.ctx)
        if rc == -1:
            raise MemoryError("popcount_matmul_acc: could not allocate a buffer")
        if rc == 0:
            return est.sums()
        C[...] = 0  # this path does not write the estimate in its pass: the product, then the pass
    with nogil:
        mpl_popcount_matmul_acc(xptr, m, yptr, n, W, cptr, ldc, weight, cmethod)
    return None if est is None else est.finish(C)


cdef class PackedInt8:
    """An int8 [k, n] operand packed once for the VNNI kernels (pack_int8): 64-column
    panels in which each 32-bit lane holds 4 consecutive k of one column.  Every product
    with the same right operand reuses it."""
    cdef readonly Py_ssize_t k, n
    cdef readonly object data  # uint8 buffer, mpl_vnni_packed_size(k, n) bytes

    @property
    def shape(self):
        return (self.k, self.n)

    @property
    def nbytes(self):
        return self.data.nbytes


def pack_int8(Y, int shift=0):
    """Y (C-contiguous int8 [k, n]) packed for int8_matmul_acc's VNNI paths; with ``shift``, the
    values ``Y >> shift`` (arithmetic: a signed top bit field of int8 storage) in the same pass."""
    _require("Y", Y, (np.int8,))
    if not 0 <= shift < 8:
        raise ValueError(f"shift must be in 0..7, got {shift}")
    cdef Py_ssize_t k = Y.shape[0], n = Y.shape[1]
    cdef PackedInt8 out = PackedInt8.__new__(PackedInt8)
    out.k, out.n = k, n
    out.data = np.zeros(mpl_vnni_packed_size(k, n), dtype=np.uint8)
    if k == 0 or n == 0:
        return out
    cdef const int8_t *src = <const int8_t *>cnp.PyArray_DATA(Y)
    cdef int8_t *dst = <int8_t *>cnp.PyArray_DATA(out.data)
    with nogil:
        mpl_vnni_pack_b(src, k, n, shift, dst)
    return out


_VNNI_ISA = {"avx512vnni": MPL_VNNI_ZMM, "avxvnni": MPL_VNNI_YMM_VEX,
             "avx512vnni-ymm": MPL_VNNI_YMM_EVEX, "c": MPL_VNNI_PORTABLE}


def _int8_method(method, int x_max, bint packed):
    """Resolve 'auto' and check that the method exists here and takes x_max."""
    if method == "auto":
        method = _auto_int8(x_max)
        if packed and method not in _VNNI_ISA:
            method = "c"
    allowed = int8_methods()
    if method not in allowed:
        raise ValueError(f"method must be 'auto' or one of {allowed} on this CPU, got {method!r}")
    if x_max > 127 and method not in FULL_8BIT_METHODS:
        raise ValueError(f"method {method!r} takes X <= 127 only (x_max={x_max}); "
                         f"8-bit digits need one of {FULL_8BIT_METHODS}")
    if packed and method not in _VNNI_ISA:
        raise ValueError(f"a PackedInt8 operand needs one of {sorted(_VNNI_ISA)}, got {method!r}")
    return method


def int8_matmul_acc(X, Y, C, long long weight, int x_max=127, method="auto", start=None, estimate=None):
    """C += weight * (X @ Y), exactly; with ``start = (src, row, col[, outer])``
    C = src + row[:, None] + col[None, :] + sum_t outer(u_t, v_t) + weight * (X @ Y) instead
    (mod 2**64), written in the kernel's pass over C (VNNI paths; the others fill C first).

    ``estimate = (k, round_rel, a, b, integer, scaled)`` (estimate_tile's arguments, no
    interval): C receives the published estimate of that result instead, bit for bit
    estimate_tile's with ``out=C`` (int64 for ``integer``, else float64 in C's memory: view C
    as float64), written by the VNNI kernels' own pass over C for k <= 65536 (no pass of its
    own); returns ``(bound, sum of squares, peak)`` as estimate_tile does. ``estimate =
    ("exact", sa, sb)``: the result is the exact product and C receives it as exact_tile
    publishes it (scaled by ``sa``/``sb``, float64 in C's memory; both None: the int64 values),
    returning ``(0.0, sum of squares, peak)`` in exact_tile's bits.

    X: C-contiguous uint8 [m, k] whose values all lie in [0, x_max] (the caller
    guarantees it, it is NOT checked).  x_max <= 127 for the 'avx2' (vpmaddubsw would
    saturate) and 'blas' paths; up to 255 (full 8-bit digits) for the VNNI and 'c'
    paths.  Y: C-contiguous int8 [k, n], any values, or a PackedInt8 from pack_int8
    (VNNI and 'c' paths; packing once per operand saves the per-call packing).
    C: int64 [m, n], unit column stride, any row stride.
    method: 'auto' (AVX512-VNNI, else AVX-VNNI, else AVX2 when x_max <= 127, else
    BLAS or C), or one of int8_methods().  A small x_max lets the AVX2 path
    accumulate in int16 (faster).
    start: None, or int64 ``src`` [m, n] (unit column stride; may be C itself), ``row`` [m]
    and ``col`` [n], each None for zero, and optionally ``outer``: up to two int64 pairs
    ``(u [m], v [n])`` of rank-one terms.
    """
    _require("X", X, (np.uint8,))
    cdef bint packed = isinstance(Y, PackedInt8)
    if not packed:
        _require("Y", Y, (np.int8,))
    if not 0 <= x_max <= 255:
        raise ValueError(f"x_max must be in [0, 255], got {x_max}")
    if X.shape[1] != Y.shape[0]:
        raise ValueError(f"inner dimensions differ: X is {X.shape}, Y is {Y.shape}")
    cdef Py_ssize_t m = X.shape[0], k = X.shape[1], n = Y.shape[1]
    _require_out(C, m, n)
    method = _int8_method(method, x_max, packed)
    cdef mpl_gemm_start st
    cdef mpl_gemm_start *stp = NULL
    keep = _gemm_start(&st, start, m, n)
    if keep is not None:
        stp = &st
    if m == 0 or n == 0:
        return None if estimate is None else (0.0, 0.0, 0.0)
    cdef _Estimate est = None if estimate is None else _Estimate(estimate, m, n)
    cdef int64_t[:, :] cv = C
    cdef int64_t *cptr = &cv[0, 0]
    cdef ptrdiff_t ldc = cv.strides[0] // 8
    cdef bint vnni = packed or method in ("avx512vnni", "avxvnni", "avx512vnni-ymm")
    if stp != NULL and (k == 0 or not vnni):  # the start first, then accumulate
        with nogil:
            mpl_gemm_start_fill(stp, cptr, ldc, m, n)
        stp = NULL
    if k == 0:
        return None if est is None else est.finish(C)
    if method == "blas":  # in its own module, so that only BLAS users pay for importing scipy.linalg
        from mpilayer import _blas_kernels
        _blas_kernels.int8_matmul_blas_acc(X, Y, C, weight)
        return None if est is None else est.finish(C)
    cdef const uint8_t[:, ::1] xv = X
    cdef const uint8_t *xptr = &xv[0, 0]
    cdef const int8_t *yptr
    cdef int rc
    cdef int isa
    cdef mpl_estimate_ctx *ep
    if vnni:
        if not packed:
            Y = pack_int8(Y)
        yptr = <const int8_t *>cnp.PyArray_DATA((<PackedInt8>Y).data)
        isa = _VNNI_ISA[method]
        ep = NULL if est is None else est.ctx
        with nogil:
            rc = mpl_vnni_gemm_acc(xptr, yptr, m, k, n, cptr, ldc, weight, isa, stp, ep)
        if rc == -1:
            raise MemoryError("int8_matmul_acc: could not allocate work buffers")
        if rc != 0:
            raise RuntimeError(f"int8_matmul_acc: path {method!r} unavailable (code {rc})")
        return None if est is None else est.sums()
    yptr = <const int8_t *>cnp.PyArray_DATA(Y)
    cdef bint use_avx2 = method == "avx2"
    with nogil:
        if use_avx2:
            rc = mpl_int8_gemm_acc_avx2(xptr, yptr, m, k, n, cptr, ldc, weight, x_max)
        else:
            rc = mpl_int8_gemm_acc_c(xptr, yptr, m, k, n, cptr, ldc, weight)
    if rc != 0:
        raise MemoryError("int8_matmul_acc: could not allocate work buffers")
    return None if est is None else est.finish(C)


cdef class _Estimate:
    """The estimate pass of int8_matmul_acc's ``estimate`` (estimates.h's mpl_estimate_ctx), with
    the side vectors it reads kept alive."""
    cdef mpl_estimate_ctx *ctx
    cdef _Side sa, sb
    cdef Py_ssize_t m, n
    cdef object scales

    def __cinit__(self, estimate, Py_ssize_t m, Py_ssize_t n):
        self.ctx = NULL
        self.m, self.n = m, n
        if len(estimate) == 3 and isinstance(estimate[0], str) and estimate[0] == "exact":
            self._exact(estimate[1], estimate[2])
            return
        if len(estimate) != 6:
            raise ValueError("estimate must be (k, round_rel, a, b, integer, scaled)")
        k, round_rel, a, b, integer, scaled = estimate
        if (a.get("scale") is None) != (b.get("scale") is None):
            raise ValueError("both sides carry scales, or neither")
        if scaled and (integer or a.get("scale") is None):
            raise ValueError("scaled: real-valued sides with scales only")
        self.sa, self.sb = _Side(a, m), _Side(b, n)
        self.ctx = mpl_estimate_begin(m, n, k, round_rel, &self.sa.side, &self.sb.side, bool(integer), bool(scaled))
        if self.ctx == NULL:
            raise MemoryError("int8_matmul_acc: no memory for the estimate pass")

    def _exact(self, sa, sb):
        if (sa is None) != (sb is None):
            raise ValueError("estimate ('exact', sa, sb): both scales, or neither")
        cdef const double *pa = NULL
        cdef const double *pb = NULL
        if sa is not None:
            self.scales = (_axis_vector("sa", np.asarray(sa, dtype=np.float64), self.m, np.float64),
                           _axis_vector("sb", np.asarray(sb, dtype=np.float64), self.n, np.float64))
            pa = <const double *>cnp.PyArray_DATA(self.scales[0])
            pb = <const double *>cnp.PyArray_DATA(self.scales[1])
        self.ctx = mpl_exact_begin(self.m, pa, pb, NULL, NULL, NULL, NULL)
        if self.ctx == NULL:
            raise MemoryError("int8_matmul_acc: no memory for the estimate pass")

    def finish(self, C):
        """The estimate pass over C in place (paths without it in their flush); the sums."""
        cdef int64_t[:, :] cv = C
        cdef ptrdiff_t ld = cv.strides[0] // 8
        if self.m and self.n:
            with nogil:
                mpl_estimate_rows(self.ctx, 0, 0, &cv[0, 0], ld, &cv[0, 0], ld, self.m, self.n)
        return self.sums()

    def sums(self):
        """``(bound, sum of squares, peak)``; the context is freed."""
        cdef mpl_tile_sums s
        mpl_estimate_end(self.ctx, &s)
        self.ctx = NULL
        return s.bound, s.estimate_sq, s.peak

    def __dealloc__(self):
        if self.ctx != NULL:
            mpl_estimate_end(self.ctx, NULL)


cdef object _gemm_start(mpl_gemm_start *st, start, Py_ssize_t m, Py_ssize_t n):
    """Fill ``st`` from ``start = (src, row, col[, outer])``; return the arrays it points into
    (keep them alive), or None for no start."""
    if start is None:
        return None
    if len(start) not in (3, 4):
        raise ValueError("start must be (src, row, col) or (src, row, col, outer)")
    src, row, col = start[:3]
    outer = list(start[3]) if len(start) == 4 and start[3] is not None else []
    if len(outer) > 2:
        raise ValueError(f"start: at most 2 rank-one terms, got {len(outer)}")
    st.src = NULL
    st.ld_src = 0
    st.row = NULL
    st.col = NULL
    st.u[0] = st.u[1] = st.v[0] = st.v[1] = NULL
    keep = []
    cdef int t
    for t in range(len(outer)):
        u = _axis_vector("u", outer[t][0], m, np.int64)
        v = _axis_vector("v", outer[t][1], n, np.int64)
        keep += [u, v]
        if m and n:
            st.u[t] = <const int64_t *>cnp.PyArray_DATA(u)
            st.v[t] = <const int64_t *>cnp.PyArray_DATA(v)
    if src is not None:
        _require("src", src, (np.int64,), contiguous=False)
        if src.shape != (m, n):
            raise ValueError(f"src must have shape {(m, n)}, got {src.shape}")
        if m and n and ((n > 1 and src.strides[1] != 8) or src.strides[0] % 8):
            raise ValueError(f"src must have unit stride along columns and a row stride of whole "
                             f"elements, got strides {src.strides}")
        keep.append(src)
        if m and n:
            st.src = <const int64_t *>cnp.PyArray_DATA(src)
            st.ld_src = src.strides[0] // 8
    if row is not None:
        row = _axis_vector("row", row, m, np.int64)
        keep.append(row)
        if m:
            st.row = <const int64_t *>cnp.PyArray_DATA(row)
    if col is not None:
        col = _axis_vector("col", col, n, np.int64)
        keep.append(col)
        if n:
            st.col = <const int64_t *>cnp.PyArray_DATA(col)
    return keep


# --------------------------------------------------------------- estimates ---

cdef class _Side:
    """An mpl_side (estimates.h) over contiguous copies of the vectors of ``v``, kept alive here."""
    cdef mpl_side side
    cdef list keep

    def __init__(self, dict v, Py_ssize_t length):
        self.keep = []
        self.side.alpha = self._f(v["alpha"], length)
        self.side.ta = self._f(v["ta"], length)
        self.side.b = self._f(v["b"], length)
        self.side.dinf = self._f(v["dinf"], length)
        self.side.r2 = self._f(v["r2"], length)
        self.side.h1 = self._f(v["h1"], length)
        self.side.h2 = self._f(v["h2"], length)
        self.side.q1 = self._f(v["q1"], length)
        self.side.q2 = self._f(v["q2"], length)
        self.side.scale = NULL if v.get("scale") is None else self._f(v["scale"], length)
        self.side.pos_full = self._i(v["pos_full"], length)
        self.side.neg_full = self._i(v["neg_full"], length)
        self.side.pos_trunc = self._i(v["pos_trunc"], length)
        self.side.neg_trunc = self._i(v["neg_trunc"], length)
        self.side.zc = self._i(v["zc"], length)
        self.side.z = self._i(v["z"], length)

    cdef const double *_f(self, x, Py_ssize_t length) except? NULL:
        arr = np.ascontiguousarray(x, dtype=np.float64)
        if arr.shape != (length,):
            raise ValueError(f"side vectors must have shape ({length},), got {arr.shape}")
        self.keep.append(arr)
        cdef const cnp.float64_t[::1] view = arr
        return &view[0] if length else NULL

    cdef const int64_t *_i(self, x, Py_ssize_t length) except? NULL:
        arr = np.ascontiguousarray(x, dtype=np.int64)
        if arr.shape != (length,):
            raise ValueError(f"side vectors must have shape ({length},), got {arr.shape}")
        self.keep.append(arr)
        cdef const cnp.int64_t[::1] view = arr
        return <const int64_t *>&view[0] if length else NULL


def estimate_tile(acc, long long k, long long delta, double round_rel, dict a, dict b,
                  bint integer, bint keep=True, bint interval=False, bint scaled=False, out=None):
    """One tile's estimate, certified interval and sums in one pass (estimates.py documents
    the formulas; ``a``/``b`` hold the per-row / per-column vectors named in estimates.h).

    Returns ``(estimate or None, lo or None, hi or None, bound, sum of squares, peak)``; the
    estimate is int64 for ``integer``, else float64; bound, sums and peak are scaled when the
    sides carry scales. Without ``interval`` the estimate is neither intersected with the
    truncation interval nor clipped, and ``bound`` is only the largest rounding allowance
    (the caller adds a separable radius: estimates.py); then ``scaled`` returns the estimate
    times the scales, ``(est * sa_i) * sb_j``, as published (sides with scales only), and
    ``out`` (C-contiguous, int64 for ``integer``, else float64, m x n) receives the estimate: it
    may share acc's memory (e.g. ``acc`` or ``acc.view(np.float64)``), which it then overwrites."""
    _require("acc", acc, (np.int64,), contiguous=True)
    cdef Py_ssize_t m = acc.shape[0], n = acc.shape[1]
    if (a.get("scale") is None) != (b.get("scale") is None):
        raise ValueError("both sides carry scales, or neither")
    if scaled and (interval or integer or a.get("scale") is None):
        raise ValueError("scaled: real-valued sides with scales and no interval only")
    cdef _Side sa = _Side(a, m)
    cdef _Side sb = _Side(b, n)
    if out is not None:
        if interval or not keep:
            raise ValueError("out: for the estimate alone (keep=True, interval=False)")
        _require("out", out, (np.int64 if integer else np.float64,))
        if out.shape != (m, n) or not out.flags.writeable:
            raise ValueError(f"out must be a writeable array of shape {(m, n)}")
    est = out if out is not None else (np.empty((m, n), dtype=np.int64 if integer else np.float64)) if keep else None
    lo = np.empty((m, n), dtype=np.int64) if interval else None
    hi = np.empty((m, n), dtype=np.int64) if interval else None
    cdef mpl_tile_sums sums
    sums.bound = 0.0
    sums.estimate_sq = 0.0
    sums.peak = 0.0
    if m == 0 or n == 0:
        return est, lo, hi, 0.0, 0.0, 0.0
    cdef const cnp.int64_t[:, ::1] A = acc
    cdef cnp.float64_t[:, ::1] ef
    cdef cnp.int64_t[:, ::1] ei, lv, hv
    cdef double *pf = NULL
    cdef int64_t *pi = NULL
    cdef int64_t *pl = NULL
    cdef int64_t *ph = NULL
    if keep and integer:
        ei = est
        pi = &ei[0, 0]
    elif keep:
        ef = est
        pf = &ef[0, 0]
    if interval:
        lv = lo
        hv = hi
        pl = &lv[0, 0]
        ph = &hv[0, 0]
    with nogil:
        if interval:
            mpl_estimate_tile(&A[0, 0], n, m, n, k, delta, round_rel, &sa.side, &sb.side, integer,
                              pf, pi, pl, ph, n, &sums)
        else:
            mpl_estimate_fast(&A[0, 0], n, m, n, k, round_rel, &sa.side, &sb.side, integer, pf, pi, n,
                              scaled, &sums)
    if sums.bound < 0:
        raise MemoryError("estimate_tile: no memory for a column buffer")
    return est, lo, hi, sums.bound, sums.estimate_sq, sums.peak


# --------------------------------------------------------------- quantise and encode ---

cdef list _setup_fields(mpl_fields *f, fields, Py_ssize_t rows, Py_ssize_t cols, int storage_bits):
    """Output buffers of the fields ``(lo, width)``, shaped as wire_format.encode_component makes
    them: packed planes (width <= 3, zeroed, 1-D), else rows x cols uint8/uint16."""
    cdef list outs = []
    cdef int i = 0
    fields = list(fields)
    if len(fields) > MPL_MAX_FIELDS:
        raise ValueError(f"at most {MPL_MAX_FIELDS} fields, got {len(fields)}")
    f.n = len(fields)
    for lo, width in fields:
        if not (0 <= lo and 1 <= width and lo + width <= storage_bits):
            raise ValueError(f"field (lo={lo}, width={width}) outside {storage_bits}-bit storage")
        if width <= 3:
            buf = np.zeros((rows * cols * width + 7) // 8, dtype=np.uint8)
        elif width <= 8:
            buf = np.empty((rows, cols), dtype=np.uint8)
        else:
            buf = np.empty((rows, cols), dtype=np.uint16)
        f.lo[i] = lo
        f.width[i] = width
        f.out[i] = cnp.PyArray_DATA(buf)
        outs.append(buf)
        i += 1
    return outs


cdef _axis_vector(name, v, Py_ssize_t length, dtype):
    arr = np.ascontiguousarray(v)
    if arr.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {arr.dtype}")
    if arr.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {arr.shape}")
    return arr


def quantize_methods():
    """Every quantising loop this CPU runs, portable first (quantize_encode's ``method``)."""
    return ["c", "avx512"] if mpl_quantize_simd() else ["c"]


def quantize_encode(x, scale, zero, int bits, int axis, fields=(), method="auto"):
    """``q' = clip(rint(x / scale), -qmax, qmax) - zero`` and the wire form of ``fields`` of q',
    in one pass (cython_kernels/quantize.c); bit-identical to
    ``shifted(quantize_real_block(x, s, bits), zero, ...)`` and ``encode_component``.

    ``x``: float32/float64 block with contiguous rows (any row stride: a block cut from wider
    rows is read in place); ``scale``: float64, a 0-d value or a vector along ``axis`` (0: one
    per row, 1: one per column); ``zero``: None or an int64 vector along ``axis``; ``fields``:
    ``(lo, width)`` bit fields of q' to encode; ``method``: ``"auto"`` (AVX-512 where the CPU
    has it), ``"c"`` or ``"avx512"`` (quantize_methods), the same bits either way. Returns
    ``(q', [buffers])`` with q' int8 for ``bits <= 8``, else int16 (C-contiguous); ``qmax =
    2**(bits-1) - 1``.
    """
    _require("x", x, (np.float32, np.float64), contiguous=False)
    if method not in ("auto", "c", "avx512"):
        raise ValueError(f"method must be 'auto', 'c' or 'avx512', got {method!r}")
    if method == "avx512" and not mpl_quantize_simd():
        raise ValueError("method 'avx512': this CPU (or build) has no AVX-512 F/BW/VL")
    cdef int simd = method != "c"
    if x.shape[1] > 1 and x.strides[1] != x.itemsize or x.shape[0] > 1 and (x.strides[0] < 0 or x.strides[0] % x.itemsize):
        x = np.ascontiguousarray(x)
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    cdef Py_ssize_t rows = x.shape[0], cols = x.shape[1]
    cdef Py_ssize_t length = rows if axis == 0 else cols
    cdef int elsize = 1 if bits <= 8 else 2
    q = np.empty((rows, cols), dtype=np.int8 if elsize == 1 else np.int16)
    cdef double s0 = 1.0
    cdef const double *sv = NULL
    cdef const int64_t *zv = NULL
    sarr = np.asarray(scale)
    if sarr.dtype != np.float64:
        raise TypeError(f"scale must be float64 (numpy divides float32 by it in float64), got {sarr.dtype}")
    if sarr.ndim == 0:
        s0 = float(sarr)
    else:
        sarr = _axis_vector("scale", sarr, length, np.float64)
        if length:
            sv = <const double *>cnp.PyArray_DATA(sarr)
    zarr = None
    if zero is not None:
        zarr = _axis_vector("zero", zero, length, np.int64)
        if length:
            zv = <const int64_t *>cnp.PyArray_DATA(zarr)
    cdef mpl_fields f
    outs = _setup_fields(&f, fields, rows, cols, 8 * elsize)
    if rows == 0 or cols == 0:
        return q, outs
    cdef const void *xp = cnp.PyArray_DATA(x)
    cdef void *qp = cnp.PyArray_DATA(q)
    cdef int is_double = x.dtype == np.float64
    cdef int qmax = (1 << (bits - 1)) - 1
    cdef ptrdiff_t ldx = x.strides[0] // x.itemsize if rows > 1 else cols
    cdef int rc
    with nogil:
        rc = mpl_quantize_encode(xp, is_double, rows, cols, ldx, s0,
                                 sv if axis == 0 else NULL, sv if axis == 1 else NULL,
                                 zv if axis == 0 else NULL, zv if axis == 1 else NULL,
                                 qmax, qp, elsize, &f, simd)
    if rc != 0:
        raise MemoryError("quantize_encode: could not allocate a row buffer")
    return q, outs


def encode_fields(q, fields):
    """The wire form of ``fields`` (``(lo, width)``) of an int8/int16 block, as
    wire_format.encode_component makes each (packed planes for widths <= 3, else uint8/uint16)."""
    _require("q", q, (np.int8, np.int16), contiguous=False)
    if q.shape[1] > 1 and q.strides[1] != q.itemsize or q.strides[0] % q.itemsize:
        q = np.ascontiguousarray(q)
    cdef Py_ssize_t rows = q.shape[0], cols = q.shape[1]
    cdef int elsize = q.itemsize
    cdef mpl_fields f
    outs = _setup_fields(&f, fields, rows, cols, 8 * elsize)
    if rows == 0 or cols == 0:
        return outs
    cdef const void *qp = cnp.PyArray_DATA(q)
    cdef ptrdiff_t ld = q.strides[0] // elsize
    cdef int rc
    with nogil:
        rc = mpl_encode_fields(qp, elsize, rows, cols, ld, &f)
    if rc != 0:
        raise MemoryError("encode_fields: could not allocate a row buffer")
    return outs


cdef _line_layout(qp):
    """``(stored block, columns, in place, row stride)``: lines of ``qp`` are its rows (columns=0)
    or, for a transposed C-contiguous block, the columns of the stored block ``qp.T`` (columns=1),
    read in place; otherwise a contiguous copy (in place False). The row stride of the stored
    block is in elements."""
    cdef int elsize = qp.itemsize
    if qp.shape[1] <= 1 or qp.strides[1] == elsize:
        src, columns, in_place = ((qp, 0, True) if qp.shape[0] <= 1 or qp.strides[0] % elsize == 0
                                  else (np.ascontiguousarray(qp), 0, False))
    elif qp.strides[0] == elsize:
        src, columns, in_place = qp.T, 1, True
    else:
        src, columns, in_place = np.ascontiguousarray(qp), 0, False
    return src, columns, in_place, (src.strides[0] // elsize) if src.shape[0] > 1 else src.shape[1]


def direct_sums(qp, zero, shifts, shifted=None):
    """The per-row sums ``estimates.SideStats`` keeps, of an int8/int16 block ``qp`` of q' (rows =
    the side's major axis; a transposed C-contiguous block is read in place), in one compiled
    pass (estimates.c). Returns int64 ``(8 + 5 * len(shifts), rows)``: sq, sqq, sabs, sabs_full
    (|q' + zero|), qmin, qmax, pos, neg, then per shift sd, sdd, sqd, pos, neg of the truncation.

    ``shifted``: ``qp`` is then the block before its zero points, and ``q' = qp - zero`` (per row;
    in qp's dtype, wrapping, as estimates.shifted) is written into ``shifted`` (same dtype and
    shape as ``qp``, laid out as the block qp is read from: C-contiguous, or its transpose) and
    summed in the same pass."""
    _require("qp", qp, (np.int8, np.int16), contiguous=False)
    cdef Py_ssize_t length = qp.shape[0], k = qp.shape[1]
    cdef int elsize = qp.itemsize
    cdef int columns
    cdef ptrdiff_t ld
    src, columns, in_place, ld = _line_layout(qp)
    cdef void *sptr_out = NULL
    cdef ptrdiff_t ld_out = 0
    if shifted is not None:
        _require("shifted", shifted, (qp.dtype,), contiguous=False)
        if shifted.shape != qp.shape or not shifted.flags.writeable:
            raise ValueError(f"shifted must be a writeable array of shape {qp.shape}")
        stored = shifted.T if columns else shifted
        if not stored.flags.c_contiguous or not in_place:
            raise ValueError("shifted: qp and shifted must be C-contiguous, or both transposes of C-contiguous blocks")
        ld_out = stored.shape[1]
        sptr_out = cnp.PyArray_DATA(stored)
    zarr = _axis_vector("zero", np.asarray(zero, dtype=np.int64), length, np.int64)
    shift_list = [int(v) for v in shifts]
    cdef int n_shifts = len(shift_list)
    for v in shift_list:
        if not 0 <= v < 8 * elsize:
            raise ValueError(f"shift {v} outside {8 * elsize}-bit storage")
    cdef cnp.ndarray sh = np.asarray(shift_list if n_shifts else [0], dtype=np.intc)
    out = np.zeros((MPL_SUMS_FIXED + 5 * n_shifts, length), dtype=np.int64)
    out[4] = np.iinfo(np.int64).max
    out[5] = np.iinfo(np.int64).min
    if length == 0 or k == 0:
        return out
    cdef Py_ssize_t srows = src.shape[0], scols = src.shape[1]
    cdef const void *qptr = cnp.PyArray_DATA(src)
    cdef const int64_t *zptr = <const int64_t *>cnp.PyArray_DATA(zarr)
    cdef const int *sptr = <const int *>cnp.PyArray_DATA(sh)
    cdef int64_t *optr = <int64_t *>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = mpl_line_sums(qptr, elsize, srows, scols, ld, columns, zptr, sptr, n_shifts, optr, length,
                           sptr_out, ld_out)
    if rc != 0:
        raise MemoryError("direct_sums: could not allocate a buffer")
    return out


def line_range(qp):
    """Per row of an int8/int16 block ``qp`` (a transposed C-contiguous block is read in place):
    int64 ``(3, rows)`` of the exact sum, the minimum and the maximum, in one compiled pass
    (estimates.c): what the zero points need, without the other sums of :func:`direct_sums`."""
    _require("qp", qp, (np.int8, np.int16), contiguous=False)
    cdef Py_ssize_t length = qp.shape[0], k = qp.shape[1]
    cdef int elsize = qp.itemsize
    cdef int columns
    cdef ptrdiff_t ld
    src, columns, _, ld = _line_layout(qp)
    out = np.zeros((3, length), dtype=np.int64)
    out[1] = np.iinfo(np.int64).max
    out[2] = np.iinfo(np.int64).min
    if length == 0 or k == 0:
        return out
    cdef Py_ssize_t srows = src.shape[0], scols = src.shape[1]
    cdef const void *qptr = cnp.PyArray_DATA(src)
    cdef int64_t *optr = <int64_t *>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = mpl_line_range(qptr, elsize, srows, scols, ld, columns, optr, length)
    if rc != 0:
        raise MemoryError("line_range: could not allocate a buffer")
    return out


def field_digits(q, int lo, int width, bint signed, int d, int n, flips):
    """The int8 kernels' digits of a bit field of the int8/int16 array ``q`` (C-contiguous), in one
    pass (quantize.c): ``x`` = bits lo..lo+width-1 (sign-extended when ``signed``: the top field of
    sign-extended values), digit t = ``(x >> d*t) & (2**d - 1)`` for t < n-1, the top digit
    ``x >> d*(n-1)`` (masked to the field unless signed), each XORed with ``flips[t]``; returns the
    n digits as uint8 arrays of q's shape (their low bytes: view int8 where signed)."""
    _require("q", q, (np.int8, np.int16))
    cdef int elsize = q.itemsize
    if not (1 <= n <= 16 and 1 <= d <= 8 and lo >= 0 and width >= 1 and lo + width <= 8 * elsize
            and d * (n - 1) < width and width - d * (n - 1) <= (8 if signed else d) and len(flips) == n):
        raise ValueError(f"field_digits: bad field lo={lo} width={width} or digits d={d} n={n} "
                         f"for {q.dtype} (flips: {len(flips)})")
    outs = [np.empty(q.shape, dtype=np.uint8) for _ in range(n)]
    cdef unsigned flip_c[16]
    cdef uint8_t *ptrs[16]
    cdef int t
    for t in range(n):
        flip_c[t] = <unsigned>(int(flips[t]) & 0xff)
        ptrs[t] = <uint8_t *>cnp.PyArray_DATA(outs[t])
    cdef size_t count = q.size
    cdef const void *qptr = cnp.PyArray_DATA(q)
    with nogil:
        mpl_field_digits(qptr, elsize, count, lo, width, signed, d, n, flip_c, ptrs)
    return outs


def exact_tile(acc, zca, za, zb, sqb, sa, sb):
    """The exact tile as published, in one pass: ``e = acc + outer(zca, zb) + outer(za, sqb)``
    (int64, as ``estimates.exact_product``; zero points None: ``e = acc``), scaled
    ``(e * sa[:, None]) * sb[None, :]`` (float64, as ``layered.scaled_estimate``) unless ``sa`` is
    None. Returns ``(tile, sum of squares, max |tile|)``."""
    _require("acc", acc, (np.int64,), contiguous=True)
    cdef Py_ssize_t m = acc.shape[0], n = acc.shape[1]
    keep = []

    def vec(name, v, Py_ssize_t length, dtype):
        arr = _axis_vector(name, np.asarray(v, dtype=dtype), length, dtype)
        keep.append(arr)
        return arr

    cdef const int64_t *p_zca = NULL
    cdef const int64_t *p_za = NULL
    cdef const int64_t *p_zb = NULL
    cdef const int64_t *p_sqb = NULL
    cdef const double *p_sa = NULL
    cdef const double *p_sb = NULL
    if zb is not None and m and n:
        p_zca = <const int64_t *>cnp.PyArray_DATA(vec("zca", zca, m, np.int64))
        p_za = <const int64_t *>cnp.PyArray_DATA(vec("za", za, m, np.int64))
        p_zb = <const int64_t *>cnp.PyArray_DATA(vec("zb", zb, n, np.int64))
        p_sqb = <const int64_t *>cnp.PyArray_DATA(vec("sqb", sqb, n, np.int64))
    scaled = sa is not None
    if scaled and m and n:
        p_sa = <const double *>cnp.PyArray_DATA(vec("sa", sa, m, np.float64))
        p_sb = <const double *>cnp.PyArray_DATA(vec("sb", sb, n, np.float64))
    out = np.empty((m, n), dtype=np.float64 if scaled else np.int64)
    if m == 0 or n == 0:
        return out, 0.0, 0.0
    cdef const int64_t *p_acc = <const int64_t *>cnp.PyArray_DATA(acc)
    cdef double *p_of = <double *>cnp.PyArray_DATA(out) if scaled else NULL
    cdef int64_t *p_oi = NULL if scaled else <int64_t *>cnp.PyArray_DATA(out)
    cdef double est_sq = 0.0, peak = 0.0
    cdef int rc
    with nogil:
        rc = mpl_exact_tile(p_acc, m, n, p_zca, p_za, p_zb, p_sqb, p_sa, p_sb, p_of, p_oi, &est_sq, &peak)
    if rc != 0:
        raise MemoryError("exact_tile: no memory for its sums")
    return out, est_sq, peak
