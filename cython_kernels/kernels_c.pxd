# The C side of mpilayer._kernels: every function, type and constant _kernels.pyx calls, by
# the header it comes from (cython_kernels/*.h document them); _kernels.pyx cimports it all.
from libc.stdint cimport int8_t, int64_t, uint8_t, uint64_t


cdef extern from "cpu_dispatch.h":
    int MPL_X86
    int MPL_HAVE_AVXVNNI
    int mpl_cpu_avx2() nogil
    int mpl_cpu_popcnt() nogil
    int mpl_cpu_avx512() nogil
    int mpl_cpu_vpopcntdq() nogil
    int mpl_cpu_avx512vnni() nogil
    int mpl_cpu_avxvnni() nogil

cdef extern from "peaks.h":
    int MPL_PEAK_VNNI512, MPL_PEAK_POPCNT512, MPL_PEAK_FMA512, MPL_PEAK_MADDUBS256
    int MPL_PEAK_POPCNT256, MPL_PEAK_FMA256, MPL_PEAK_AVXVNNI256
    uint64_t mpl_peak_run(int which, uint64_t iters) nogil

cdef extern from "bitplanes.h":
    int MPL_METHOD_C
    int MPL_METHOD_AVX2
    int MPL_METHOD_AVX512
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
    ctypedef struct mpl_gemm_start:
        const int64_t *src
        ptrdiff_t ld_src
        const int64_t *row
        const int64_t *col
        const int64_t *u[2]
        const int64_t *v[2]
    void mpl_gemm_start_fill(const mpl_gemm_start *start, int64_t *C, ptrdiff_t ldc, size_t m, size_t n) nogil
    int MPL_VNNI_PORTABLE, MPL_VNNI_ZMM, MPL_VNNI_YMM_VEX, MPL_VNNI_YMM_EVEX
    size_t mpl_vnni_packed_size(size_t k, size_t n) nogil
    void mpl_vnni_pack_b(const int8_t *Y, size_t k, size_t n, int shift, int8_t *out) nogil
    cdef struct mpl_estimate_ctx  # estimates.h (incomplete here)
    int mpl_vnni_gemm_acc(const uint8_t *X, const int8_t *Bp, size_t m, size_t k, size_t n,
                          int64_t *C, ptrdiff_t ldc, int64_t weight, int isa,
                          const mpl_gemm_start *start, mpl_estimate_ctx *est) nogil


cdef extern from "bitplanes.h":
    int mpl_popcount_matmul_est(const uint64_t *X, size_t m, const uint64_t *Y, size_t n,
                                size_t W, int64_t *C, ptrdiff_t ldc, int64_t weight, int method,
                                mpl_estimate_ctx *est) nogil


cdef extern from "estimates.h":
    ctypedef struct mpl_side:
        const double *alpha
        const double *ta
        const double *b
        const double *dinf
        const double *r2
        const double *h1
        const double *h2
        const double *q1
        const double *q2
        const int64_t *pos_full
        const int64_t *neg_full
        const int64_t *pos_trunc
        const int64_t *neg_trunc
        const int64_t *zc
        const int64_t *z
        const double *scale
    ctypedef struct mpl_tile_sums:
        double bound
        double estimate_sq
        double peak
    int MPL_SUMS_FIXED
    int mpl_line_sums(const void *q, int elsize, size_t rows, size_t cols, ptrdiff_t ld, int columns,
                      const int64_t *zero, const int *shifts, int n_shifts, int64_t *out, size_t length,
                      void *shifted, ptrdiff_t ld_shifted) nogil
    int mpl_line_range(const void *q, int elsize, size_t rows, size_t cols, ptrdiff_t ld, int columns,
                       int64_t *out, size_t length) nogil
    void mpl_estimate_tile(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k,
                           int64_t delta, double round_rel, const mpl_side *a, const mpl_side *b,
                           int integer, double *est_f, int64_t *est_i, int64_t *lo, int64_t *hi,
                           ptrdiff_t ld_out, mpl_tile_sums *sums) nogil
    void mpl_estimate_fast(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k,
                           double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                           double *est_f, int64_t *est_i, ptrdiff_t ld_out, int scaled, mpl_tile_sums *sums) nogil
    mpl_estimate_ctx *mpl_estimate_begin(size_t m, size_t n, int64_t k, double round_rel, const mpl_side *a,
                                         const mpl_side *b, int integer, int scaled) nogil
    void mpl_estimate_block(mpl_estimate_ctx *c, size_t i, size_t j0, size_t nb, const int64_t *row,
                            void *out) nogil
    void mpl_estimate_end(mpl_estimate_ctx *c, mpl_tile_sums *sums) nogil
    void mpl_estimate_rows(mpl_estimate_ctx *c, size_t i0, size_t j0, const int64_t *acc, ptrdiff_t ld_acc,
                           void *out, ptrdiff_t ld_out, size_t m, size_t n) nogil
    mpl_estimate_ctx *mpl_exact_begin(size_t m, const double *sa, const double *sb, const int64_t *zca,
                                      const int64_t *za, const int64_t *zb, const int64_t *sqb) nogil


cdef extern from "quantize.h":
    int MPL_MAX_FIELDS
    ctypedef struct mpl_fields:
        int n
        int lo[16]
        int width[16]
        void *out[16]
    int mpl_quantize_encode(const void *x, int x_is_double, size_t rows, size_t cols, ptrdiff_t ldx,
                            double s0, const double *s_rows, const double *s_cols,
                            const int64_t *z_rows, const int64_t *z_cols, int qmax,
                            void *q, int q_elsize, const mpl_fields *fields, int simd) nogil
    int mpl_quantize_simd() nogil
    int mpl_encode_fields(const void *q, int q_elsize, size_t rows, size_t cols, ptrdiff_t ldq,
                          const mpl_fields *fields) nogil
    int mpl_exact_tile(const int64_t *acc, size_t m, size_t n, const int64_t *zca, const int64_t *za,
                       const int64_t *zb, const int64_t *sqb, const double *sa, const double *sb,
                       double *out_f, int64_t *out_i, double *est_sq, double *peak) nogil
    void mpl_field_digits(const void *q, int elsize, size_t count, int lo, int width, int sign, int d, int n,
                          const unsigned *flip, uint8_t *const *out) nogil
