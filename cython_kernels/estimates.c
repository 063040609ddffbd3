/* Operand sums and elementwise passes of mpilayer's resolution estimates; see estimates.h. */
#include "estimates.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* No fused multiply-add: the same estimate on every CPU and clone (the rounding allowances
 * of estimates.py assume separately rounded operations, which FMA only makes more accurate). */
#pragma GCC optimize("fp-contract=off")

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(MPL_NO_SIMD) && defined(__GNUC__) && !defined(__clang__)
#define MPL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MPL_CLONES
#endif

/* ------------------------------------------------------------------ operand sums */

/* Per line, the sums of estimates.SideStats by their identities: |q'+z| summed as
 * sum(x >= -z ? x : -x) + z (2 #(x >= -z) - length); the positive and negative parts as
 * (sum x +- sum |x|) / 2, of q' and of T = q' - d alike. Accumulated in ACC over chunks short
 * enough not to overflow it (int32 for int8, whose products are taken in int16 PT: the
 * vectoriser makes multiply-adds of them). Rows: reductions along the row, which the compiler
 * vectorises. Columns: as many at a time as one vector (GCC's extension, one AVX-512
 * register) has lanes of ACC, down MPL_ROWS rows whose cache lines stay in L1 for the
 * neighbouring columns. */
#define MPL_CHUNK 4096   /* elements of a row per chunk */
#define MPL_ROWS 256     /* rows per chunk of a column block */
#define MPL_VBYTES 64    /* bytes of a vector of accumulators: its lanes are a block of columns */

static inline void fold_fixed(int64_t *out, size_t length, size_t line, int64_t z, int64_t count,
                              int64_t s, int64_t ss, int64_t sa, int64_t sf, int64_t nge, int64_t mn, int64_t mx)
{
    int64_t *o = out + line;
    o[0] += s;
    o[length] += ss;
    o[2 * length] += sa;
    o[3 * length] += sf + z * (2 * nge - count);
    if (mn < o[4 * length]) o[4 * length] = mn;
    if (mx > o[5 * length]) o[5 * length] = mx;
    o[6 * length] += (s + sa) / 2;
    o[7 * length] += (s - sa) / 2;
}

static inline void fold_shift(int64_t *out, size_t length, size_t line, int r, int64_t s,
                              int64_t sd, int64_t sdd, int64_t sqd, int64_t ta)
{
    int64_t *o = out + (size_t)(MPL_SUMS_FIXED + 5 * r) * length + line;
    const int64_t st = s - sd;   /* sum of T */
    o[0] += sd;
    o[length] += sdd;
    o[2 * length] += sqd;
    o[3 * length] += (st + ta) / 2;
    o[4 * length] += (st - ta) / 2;
}

/* -z clamped into [lo, hi + 1]: the same comparisons x >= c for every x in [lo, hi] */
static inline int32_t pivot(int64_t z, int32_t lo, int32_t hi)
{
    return z >= -(int64_t)lo ? lo : z <= -(int64_t)hi - 1 ? hi + 1 : (int32_t)-z;
}

#define MPL_LINE_SUMS(NAME, QT, PT, ACC, QMIN, QMAX)                                               \
enum { NAME##_COLS = MPL_VBYTES / sizeof(ACC) };                                                   \
typedef ACC vacc_##NAME __attribute__((vector_size(MPL_VBYTES)));                                  \
/* one vector's elements widened into its lanes by a loop the compiler vectorises (GCC 12         \
 * lowers __builtin_convertvector from bytes element by element) */                               \
static inline __attribute__((always_inline)) void widen_##NAME(vacc_##NAME *v, const QT *x)        \
{                                                                                                  \
    ACC t[NAME##_COLS];                                                                            \
    for (int l = 0; l < NAME##_COLS; l++)                                                          \
        t[l] = x[l];                                                                               \
    memcpy(v, t, sizeof *v);                                                                       \
}                                                                                                  \
MPL_CLONES static void NAME##_rows(const QT *q, size_t rows, size_t cols, ptrdiff_t ld,            \
                                   const int64_t *zero, const int *shifts, int n_shifts,           \
                                   int64_t *out, size_t length, QT *shifted, ptrdiff_t ld_s)       \
{                                                                                                  \
    for (size_t i = 0; i < rows; i++) {                                                            \
        const QT *line = q + (ptrdiff_t)i * ld;                                                    \
        if (shifted) {  /* q' = q - z written first; the sums read it back from L1 */              \
            QT *restrict o = shifted + (ptrdiff_t)i * ld_s;                                        \
            const QT zq = (QT)zero[i];                                                             \
            for (size_t j = 0; j < cols; j++)                                                      \
                o[j] = (QT)(line[j] - zq);                                                         \
            line = o;                                                                              \
        }                                                                                          \
        for (size_t j0 = 0; j0 < cols; j0 += MPL_CHUNK) {                                          \
            const QT *restrict x = line + j0;                                                      \
            const size_t w = cols - j0 < MPL_CHUNK ? cols - j0 : MPL_CHUNK;                        \
            const int32_t c = pivot(zero[i], QMIN, QMAX);                                          \
            ACC s = 0, ss = 0, sa = 0, sf = 0, nge = 0;                                            \
            int32_t mn = QMAX, mx = QMIN;                                                          \
            for (size_t j = 0; j < w; j++) {                                                       \
                const int32_t v = x[j];                                                            \
                s += v;                                                                            \
                ss += (ACC)((PT)v * (PT)v);                                                        \
                sa += v < 0 ? -v : v;                                                              \
                sf += v >= c ? v : -v;                                                             \
                nge += v >= c;                                                                     \
                mn = v < mn ? v : mn;                                                              \
                mx = v > mx ? v : mx;                                                              \
            }                                                                                      \
            fold_fixed(out, length, i, zero[i], (int64_t)w, s, ss, sa, sf, nge, mn, mx);           \
            for (int r = 0; r < n_shifts; r++) {                                                   \
                const int32_t mask = (int32_t)((1u << shifts[r]) - 1);                             \
                ACC sd = 0, sdd = 0, sqd = 0, ta = 0;                                              \
                for (size_t j = 0; j < w; j++) {                                                   \
                    const int32_t v = x[j], d = v & mask, t = v - d;                               \
                    sd += d;                                                                       \
                    sdd += (ACC)((PT)d * (PT)d);                                                   \
                    sqd += (ACC)((PT)v * (PT)d);                                                   \
                    ta += t < 0 ? -t : t;                                                          \
                }                                                                                  \
                fold_shift(out, length, i, r, s, sd, sdd, sqd, ta);                                \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
MPL_CLONES static void NAME##_cols(const QT *q, size_t rows, size_t cols, ptrdiff_t ld,            \
                                   const int64_t *zero, const int *shifts, int n_shifts,           \
                                   int64_t *out, size_t length, QT *shifted, ptrdiff_t ld_s,       \
                                   const QT *zq)                                                   \
{                                                                                                  \
    QT pad[MPL_ROWS * NAME##_COLS];                                                                \
    for (size_t i0 = 0; i0 < rows; i0 += MPL_ROWS) {                                               \
        const size_t h = rows - i0 < MPL_ROWS ? rows - i0 : MPL_ROWS;                              \
        const QT *band = q + (ptrdiff_t)i0 * ld;                                                   \
        ptrdiff_t ldb = ld;                                                                        \
        if (shifted) {  /* the band's q' = q - z written first (zq: z per column, as QT); the     \
                         * sums read it back from L2 */                                           \
            QT *restrict o = shifted + (ptrdiff_t)i0 * ld_s;                                       \
            for (size_t i = 0; i < h; i++)                                                         \
                for (size_t j = 0; j < cols; j++)                                                  \
                    o[(ptrdiff_t)i * ld_s + j] = (QT)(band[(ptrdiff_t)i * ld + j] - zq[j]);        \
            band = o;                                                                              \
            ldb = ld_s;                                                                            \
        }                                                                                          \
        for (size_t j0 = 0; j0 < cols; j0 += NAME##_COLS) {                                        \
            const size_t w = cols - j0 < NAME##_COLS ? cols - j0 : NAME##_COLS;                    \
            const QT *blk = band + j0;                                                             \
            ptrdiff_t st = ldb;                                                                    \
            if (w < NAME##_COLS) {  /* the last columns: padded with zeros, not read past */       \
                memset(pad, 0, sizeof pad);                                                        \
                for (size_t i = 0; i < h; i++)                                                     \
                    memcpy(pad + i * NAME##_COLS, blk + (ptrdiff_t)i * ldb, w * sizeof(QT));       \
                blk = pad;                                                                         \
                st = NAME##_COLS;                                                                  \
            }                                                                                      \
            vacc_##NAME c = {0}, s = {0}, ss = {0}, sa = {0}, sf = {0}, nge = {0};                 \
            vacc_##NAME mn = s + QMAX, mx = s + QMIN;                                              \
            for (size_t l = 0; l < w; l++)                                                         \
                c[l] = pivot(zero[j0 + l], QMIN, QMAX);                                            \
            for (size_t i = 0; i < h; i++) {                                                       \
                vacc_##NAME v;                                                                     \
                widen_##NAME(&v, blk + (ptrdiff_t)i * st);                                         \
                const vacc_##NAME neg = v < 0, below = v < c, less = v < mn, more = v > mx;        \
                s += v;                                                                            \
                ss += v * v;                                                                       \
                sa += (v ^ neg) - neg;                                                             \
                sf += (v ^ below) - below;                                                         \
                nge += below + 1;                                                                  \
                mn = (v & less) | (mn & ~less);                                                    \
                mx = (v & more) | (mx & ~more);                                                    \
            }                                                                                      \
            for (size_t l = 0; l < w; l++)                                                         \
                fold_fixed(out, length, j0 + l, zero[j0 + l], (int64_t)h, s[l], ss[l], sa[l],      \
                           sf[l], nge[l], mn[l], mx[l]);                                           \
            for (int r = 0; r < n_shifts; r++) {                                                   \
                const ACC mask = (ACC)((1u << shifts[r]) - 1);                                     \
                vacc_##NAME sd = {0}, sdd = {0}, sqd = {0}, ta = {0};                              \
                for (size_t i = 0; i < h; i++) {                                                   \
                    vacc_##NAME v;                                                                 \
                    widen_##NAME(&v, blk + (ptrdiff_t)i * st);                                     \
                    const vacc_##NAME d = v & mask, t = v - d;                                     \
                    const vacc_##NAME neg = t < 0;                                                 \
                    sd += d;                                                                       \
                    sdd += d * d;                                                                  \
                    sqd += v * d;                                                                  \
                    ta += (t ^ neg) - neg;                                                         \
                }                                                                                  \
                for (size_t l = 0; l < w; l++)                                                     \
                    fold_shift(out, length, j0 + l, r, s[l], sd[l], sdd[l], sqd[l], ta[l]);        \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

MPL_LINE_SUMS(sums_i8, int8_t, int16_t, int32_t, INT8_MIN, INT8_MAX)
MPL_LINE_SUMS(sums_i16, int16_t, int64_t, int64_t, INT16_MIN, INT16_MAX)

int mpl_line_sums(const void *q, int elsize, size_t rows, size_t cols, ptrdiff_t ld, int columns,
                  const int64_t *zero, const int *shifts, int n_shifts, int64_t *out, size_t length,
                  void *shifted, ptrdiff_t ld_shifted)
{
    void *zq = NULL;  /* columns with a shifted output: z per column in the storage type */
    if (shifted && columns) {
        zq = malloc(cols * (size_t)elsize);
        if (!zq)
            return -1;
        for (size_t j = 0; j < cols; j++) {
            if (elsize == 1)
                ((int8_t *)zq)[j] = (int8_t)zero[j];
            else
                ((int16_t *)zq)[j] = (int16_t)zero[j];
        }
    }
    if (elsize == 1 && columns)
        sums_i8_cols(q, rows, cols, ld, zero, shifts, n_shifts, out, length, shifted, ld_shifted, zq);
    else if (elsize == 1)
        sums_i8_rows(q, rows, cols, ld, zero, shifts, n_shifts, out, length, shifted, ld_shifted);
    else if (columns)
        sums_i16_cols(q, rows, cols, ld, zero, shifts, n_shifts, out, length, shifted, ld_shifted, zq);
    else
        sums_i16_rows(q, rows, cols, ld, zero, shifts, n_shifts, out, length, shifted, ld_shifted);
    free(zq);
    return 0;
}

/* Sum, min and max per line in one pass: int32 partial sums over chunks of MPL_RANGE_CHUNK
 * elements (exact for int16: 2**15 * 2**15 < 2**31), folded into int64. Rows: reductions along
 * the row; columns: elementwise over each stored row, which the compiler vectorises. */
#define MPL_RANGE_CHUNK 32768
#define MPL_LINE_RANGE(NAME, QT, QMIN, QMAX)                                                       \
MPL_CLONES static void NAME##_rows(const QT *q, size_t rows, size_t cols, ptrdiff_t ld, int64_t *out, \
                                   size_t length)                                                  \
{                                                                                                  \
    for (size_t i = 0; i < rows; i++) {                                                            \
        int64_t total = 0;                                                                         \
        int32_t mn = QMAX, mx = QMIN;                                                              \
        for (size_t j0 = 0; j0 < cols; j0 += MPL_RANGE_CHUNK) {                                    \
            const QT *restrict x = q + (ptrdiff_t)i * ld + j0;                                     \
            const size_t w = cols - j0 < MPL_RANGE_CHUNK ? cols - j0 : MPL_RANGE_CHUNK;            \
            int32_t s = 0;                                                                         \
            for (size_t j = 0; j < w; j++) {                                                       \
                const int32_t v = x[j];                                                            \
                s += v;                                                                            \
                mn = v < mn ? v : mn;                                                              \
                mx = v > mx ? v : mx;                                                              \
            }                                                                                      \
            total += s;                                                                            \
        }                                                                                          \
        out[i] += total;                                                                           \
        if (mn < out[length + i]) out[length + i] = mn;                                            \
        if (mx > out[2 * length + i]) out[2 * length + i] = mx;                                    \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
MPL_CLONES static int NAME##_cols(const QT *q, size_t rows, size_t cols, ptrdiff_t ld, int64_t *out,  \
                                  size_t length)                                                   \
{                                                                                                  \
    int32_t *s = malloc(cols * sizeof(int32_t));                                                   \
    QT *mn = malloc(cols * sizeof(QT)), *mx = malloc(cols * sizeof(QT));                           \
    if (!s || !mn || !mx) {                                                                        \
        free(s); free(mn); free(mx);                                                               \
        return -1;                                                                                 \
    }                                                                                              \
    for (size_t j = 0; j < cols; j++) {                                                            \
        mn[j] = QMAX;                                                                              \
        mx[j] = QMIN;                                                                              \
    }                                                                                              \
    for (size_t i0 = 0; i0 < rows; i0 += MPL_RANGE_CHUNK) {                                        \
        const size_t h = rows - i0 < MPL_RANGE_CHUNK ? rows - i0 : MPL_RANGE_CHUNK;                \
        memset(s, 0, cols * sizeof(int32_t));                                                      \
        for (size_t i = i0; i < i0 + h; i++) {                                                     \
            const QT *restrict x = q + (ptrdiff_t)i * ld;                                          \
            int32_t *restrict sr = s;                                                              \
            QT *restrict lo = mn, *restrict hi = mx;                                               \
            for (size_t j = 0; j < cols; j++) {                                                    \
                const QT v = x[j];                                                                 \
                sr[j] += v;                                                                        \
                lo[j] = v < lo[j] ? v : lo[j];                                                     \
                hi[j] = v > hi[j] ? v : hi[j];                                                     \
            }                                                                                      \
        }                                                                                          \
        for (size_t j = 0; j < cols; j++)                                                          \
            out[j] += s[j];                                                                        \
    }                                                                                              \
    for (size_t j = 0; j < cols; j++) {                                                            \
        if (mn[j] < out[length + j]) out[length + j] = mn[j];                                      \
        if (mx[j] > out[2 * length + j]) out[2 * length + j] = mx[j];                              \
    }                                                                                              \
    free(s); free(mn); free(mx);                                                                   \
    return 0;                                                                                      \
}

MPL_LINE_RANGE(range_i8, int8_t, INT8_MIN, INT8_MAX)
MPL_LINE_RANGE(range_i16, int16_t, INT16_MIN, INT16_MAX)

int mpl_line_range(const void *q, int elsize, size_t rows, size_t cols, ptrdiff_t ld, int columns,
                   int64_t *out, size_t length)
{
    if (columns)
        return elsize == 1 ? range_i8_cols(q, rows, cols, ld, out, length)
                           : range_i16_cols(q, rows, cols, ld, out, length);
    if (elsize == 1)
        range_i8_rows(q, rows, cols, ld, out, length);
    else
        range_i16_rows(q, rows, cols, ld, out, length);
    return 0;
}

static inline double dmin(double x, double y) { return x < y ? x : y; }
static inline double dmax(double x, double y) { return x > y ? x : y; }
static inline int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
static inline int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

/* ceil/floor of x as int64 where representable (|x| < 2**62), else the fallback (a valid end).
 * By rint and selects between doubles: (int64_t)ceil(x) would become a call without a vector
 * form, and selects between integers made of comparisons become branches; so the loops
 * vectorise (rint is one instruction on the SIMD clones). */
#define MPL_I62 4611686018427387904.0
static inline int64_t ceil_or(double x, int64_t fallback)
{
    const int ok = fabs(x) < MPL_I62;
    const double xs = ok ? x : 0.0, r = rint(xs);
    return ok ? (int64_t)(r + (r < xs ? 1.0 : 0.0)) : fallback;
}
static inline int64_t floor_or(double x, int64_t fallback)
{
    const int ok = fabs(x) < MPL_I62;
    const double xs = ok ? x : 0.0, r = rint(xs);
    return ok ? (int64_t)(r - (r > xs ? 1.0 : 0.0)) : fallback;
}
/* a nonnegative int64 as a double at or above it: exact below 2**53, above it the conversion
 * may round down by less than an ulp, which 1 + 2**-51 more than covers */
static inline double up(int64_t x)
{
    const double d = (double)x;
    return x > ((int64_t)1 << 53) ? d * (1.0 + 0x1p-51) : d;
}
/* The fitted estimate of one element, alpha_i gamma_j acc + alpha_i rowsum(T_A)_i c_j
 * + b_i (gamma_j colsum(T_B)_j) + k b_i c_j (estimates.py; gtb = gamma_j colsum(T_B)_j, per column),
 * and in *mag the sum of its terms' magnitudes: round_rel times it allows for their rounding. */
static inline double fitted(int64_t acc, double al, double alta, double ba, double gamma, double bb,
                            double gtb, double kd, double *mag)
{
    const double t1 = ((double)acc * al) * gamma;
    const double t2 = alta * bb;
    const double t3 = ba * gtb;
    const double t4 = kd * (ba * bb);
    *mag = ((fabs(t1) + fabs(t2)) + fabs(t3)) + fabs(t4);
    return ((t1 + t2) + t3) + t4;
}

/* x rounded half to even (numpy.rint) for |x| < 2**62; beyond, (x > 0.5), as the floor-based
 * rounding this replaced gave (selecting between doubles, as above). An integer-valued double,
 * exactly the int64 it converts to. */
static inline double round_even(double x)
{
    const double big = x > 0.5 ? 1.0 : 0.0;
    return rint(fabs(x) < MPL_I62 ? x : big);
}

/* A tile's sum of squares and largest magnitude of y, and largest w (a rounding allowance or a
 * certified width). Each row's squares in MPL_LANES partial sums (lane j % MPL_LANES), combined
 * in a fixed order at the end of the row and added to the tile's total, so that every clone
 * and the portable build add in the same order (maxima need no such care). GCC's vector
 * extension holds the lanes: the vectoriser keeps floating-point reductions sequential (no
 * reassociation), which would leave these scalar; the extension maps them to one AVX-512
 * register, two AVX2 ones, or scalar code. */
#define MPL_LANES 8
typedef double mpl_v8d __attribute__((vector_size(8 * MPL_LANES)));
typedef int64_t mpl_v8l __attribute__((vector_size(8 * MPL_LANES)));
#define MPL_VMAX(x, y) ((mpl_v8d)((((x) > (y)) & (mpl_v8l)(x)) | (~((x) > (y)) & (mpl_v8l)(y))))
#define MPL_VABS(x) ((mpl_v8d)((mpl_v8l)(x) & INT64_MAX))

typedef struct {
    mpl_v8d sq, top, most;
    double total;
} mpl_lanes;

static inline void lanes_add(mpl_lanes *restrict s, const double *restrict y, const double *restrict w, size_t n)
{
    mpl_v8d sq = s->sq, top = s->top, most = s->most;
    size_t j = 0;
    for (; j + MPL_LANES <= n; j += MPL_LANES) {
        mpl_v8d v, u;
        memcpy(&v, y + j, sizeof v);
        memcpy(&u, w + j, sizeof u);
        sq += v * v;
        top = MPL_VMAX(top, MPL_VABS(v));
        most = MPL_VMAX(most, u);
    }
    for (int l = 0; j < n; j++, l++) {   /* n % MPL_LANES left: only at a row's end */
        sq[l] += y[j] * y[j];
        top[l] = dmax(top[l], fabs(y[j]));
        most[l] = dmax(most[l], w[j]);
    }
    s->sq = sq;
    s->top = top;
    s->most = most;
}

static inline void lanes_row_end(mpl_lanes *s)
{
    const mpl_v8d q = s->sq;
    s->total += ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
    s->sq = (mpl_v8d){0.0};
}

static void lanes_total(const mpl_lanes *s, double *sq, double *top, double *most)
{
    *sq = s->total;
    *top = *most = 0.0;
    for (int l = 0; l < MPL_LANES; l++) {
        *top = dmax(*top, s->top[l]);
        *most = dmax(*most, s->most[l]);
    }
}

/* round_even of each lane: rint as (|x| + 2**52) - 2**52 with x's sign below 2**52 (exact, in
 * the default rounding mode), x itself above (already an integer) */
static inline void vround_even(mpl_v8d *v)   /* by pointer: no vector argument in the baseline ABI */
{
    const mpl_v8d x = *v;
    const mpl_v8d one = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0};
    const mpl_v8l ok = MPL_VABS(x) < MPL_I62;
    const mpl_v8d big = (mpl_v8d)((mpl_v8l)one & (x > 0.5));   /* (x > 0.5) ? 1.0 : 0.0 */
    const mpl_v8d xs = (mpl_v8d)(((mpl_v8l)x & ok) | ((mpl_v8l)big & ~ok));
    const mpl_v8d ax = MPL_VABS(xs), r = (ax + 0x1p52) - 0x1p52;
    const mpl_v8l small = ax < 0x1p52;
    const mpl_v8d ra = (mpl_v8d)(((mpl_v8l)r & small) | ((mpl_v8l)ax & ~small));
    *v = (mpl_v8d)(((mpl_v8l)ra & INT64_MAX) | ((mpl_v8l)xs & INT64_MIN));
}

/* Both passes go over a row MPL_BLOCK columns at a time (a multiple of MPL_LANES, so the lanes
 * of the sums are those of whole rows), so that the row buffers and the column vectors stay in
 * L1; each block is computed in the buffers and copied out whole: memcpy's string stores skip
 * reading the destination's cache lines, which stores from the loops would not. */
#define MPL_BLOCK 512

/* Per row block, simple loops over its columns (estimate and radius; truncation interval;
 * intersection; rounding and sums), vectorisable, compiled for x86-64-v4 (AVX-512) and v3
 * (AVX2) besides the baseline, chosen at load time. Floating-point contraction is off (see the
 * pragma at the top): every CPU computes the same estimate bit for bit. */
MPL_CLONES
void mpl_estimate_tile(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k, int64_t delta,
                       double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                       double *est_f, int64_t *est_i, int64_t *lo, int64_t *hi, ptrdiff_t ld_out,
                       mpl_tile_sums *sums)
{
    const double kd = (double)k;
    double *gtb_all = malloc(n * sizeof(double));
    if (!gtb_all) {
        sums->bound = -1.0;   /* the caller raises MemoryError */
        return;
    }
    for (size_t j = 0; j < n; j++)
        gtb_all[j] = b->alpha[j] * b->ta[j];
    double rad[MPL_BLOCK], w[MPL_BLOCK], e[MPL_BLOCK];
    int64_t lt[MPL_BLOCK], ht[MPL_BLOCK];
    mpl_lanes lanes = {{0.0}, {0.0}, {0.0}, 0.0};
    for (size_t i = 0; i < m; i++) {
        const double al = a->alpha[i], alta = a->alpha[i] * a->ta[i], ba = a->b[i];
        const double dinf_a = a->dinf[i], r2_a = a->r2[i], h1_a = a->h1[i], h2_a = a->h2[i];
        const double q1_a = a->q1[i], q2_a = a->q2[i];
        const double sa = a->scale ? a->scale[i] : 1.0;
        const int64_t pf = a->pos_full[i], nf = a->neg_full[i], pt = a->pos_trunc[i], nt = a->neg_trunc[i];
        const int64_t zc = a->zc[i], za = a->z[i];
        for (size_t j0 = 0; j0 < n; j0 += MPL_BLOCK) {
            const size_t nb = n - j0 < MPL_BLOCK ? n - j0 : MPL_BLOCK;
            const int64_t *restrict row = acc + (ptrdiff_t)i * ld_acc + j0;
            const double *restrict b_alpha = b->alpha + j0, *restrict b_b = b->b + j0, *restrict gtb = gtb_all + j0;
            const double *restrict b_dinf = b->dinf + j0, *restrict b_r2 = b->r2 + j0, *restrict b_h1 = b->h1 + j0;
            const double *restrict b_h2 = b->h2 + j0, *restrict b_q1 = b->q1 + j0, *restrict b_q2 = b->q2 + j0;
            const double *restrict b_scale = b->scale ? b->scale + j0 : NULL;
            const int64_t *restrict b_pf = b->pos_full + j0, *restrict b_nf = b->neg_full + j0;
            const int64_t *restrict b_pt = b->pos_trunc + j0, *restrict b_nt = b->neg_trunc + j0;
            const int64_t *restrict b_zc = b->zc + j0, *restrict b_z = b->z + j0;
            const ptrdiff_t o = (ptrdiff_t)i * ld_out + j0;
            /* 1: the fitted estimate (four terms), the allowance for its rounding, the Hölder radius */
            for (size_t j = 0; j < nb; j++) {
                double mag;
                e[j] = fitted(row[j], al, alta, ba, b_alpha[j], b_b[j], gtb[j], kd, &mag);
                const double first = dmin(dinf_a * b_q1[j], r2_a * b_q2[j]) + dmin(h1_a * b_dinf[j], h2_a * b_r2[j]);
                const double second = dmin(q1_a * b_dinf[j], q2_a * b_r2[j]) + dmin(dinf_a * b_h1[j], r2_a * b_h2[j]);
                rad[j] = dmin(first, second) * (1.0 + round_rel) + round_rel * mag;
            }
            /* 2: the truncation interval around the integer centre acc + Z */
            for (size_t j = 0; j < nb; j++) {
                const int64_t centre = row[j] + zc * b_z[j] + za * b_zc[j];
                lt[j] = delta * imax(nt + b_nf[j], nf + b_nt[j]) + centre;
                ht[j] = delta * imin(pt + b_pf[j], pf + b_pt[j]) + centre;
            }
            /* 3: intersect (lt, ht become the interval) and clip the estimate into it */
            for (size_t j = 0; j < nb; j++) {
                const int64_t l = imax(lt[j], ceil_or(e[j] - rad[j], lt[j]));
                const int64_t h = imin(ht[j], floor_or(e[j] + rad[j], ht[j]));
                lt[j] = l;
                ht[j] = h;
                e[j] = dmin(dmax(e[j], (double)l), (double)h);
            }
            /* 4: integers are rounded half to even (numpy.rint) and kept in [l, h] exactly; the
             * certified width, the sums and the peak, scaled for real inputs (y in rad's storage) */
            double *restrict y = rad;
            if (integer) {
                int64_t *restrict ei = (int64_t *)rad;
                for (size_t j = 0; j < nb; j++) {
                    const int64_t x = imin(imax((int64_t)round_even(e[j]), lt[j]), ht[j]);
                    ei[j] = x;
                    e[j] = (double)x;
                    w[j] = up(imax(x - lt[j], ht[j] - x));
                }
                y = e;
                if (est_i) memcpy(est_i + o, ei, nb * sizeof(int64_t));
            } else if (b_scale) {
                for (size_t j = 0; j < nb; j++) {
                    const double s = sa * b_scale[j];
                    y[j] = (e[j] * sa) * b_scale[j];
                    w[j] = dmax(e[j] - (double)lt[j], (double)ht[j] - e[j]) * s;
                }
            } else {
                for (size_t j = 0; j < nb; j++)
                    w[j] = dmax(e[j] - (double)lt[j], (double)ht[j] - e[j]);
                y = e;
            }
            lanes_add(&lanes, y, w, nb);
            if (est_f) memcpy(est_f + o, e, nb * sizeof(double));
            if (lo) {
                memcpy(lo + o, lt, nb * sizeof(int64_t));
                memcpy(hi + o, ht, nb * sizeof(int64_t));
            }
        }
        lanes_row_end(&lanes);
    }
    free(gtb_all);
    lanes_total(&lanes, &sums->estimate_sq, &sums->peak, &sums->bound);
}

/* The estimate alone, for publishing (no interval): the four terms, the largest rounding
 * allowance of their sum, and the sums; the caller bounds the error from separable maxima.
 * Unscaled, the largest allowance is round_rel times the largest magnitude (rounding is
 * monotone), so the loops carry no multiplication for it. Row segments come in any order of
 * rows but, within a row, by ascending column, each starting at a multiple of MPL_LANES (a
 * whole pass: blocks of MPL_BLOCK; a kernel's flush: its panels of columns): each row keeps its
 * own lanes of squares, combined row by row at the end, so that the sums do not depend on how
 * the rows were cut. */
struct mpl_estimate_ctx {
    const mpl_side *a, *b;
    size_t m, n;
    double kd, round_rel;
    int integer, scaled;
    double *gtb;     /* gamma_j colsum(T_B)_j, per column */
    mpl_v8d *sq;     /* per row: its lanes of squares */
    mpl_v8d top, most;
    /* exact mode (mpl_exact_begin): the tile as mpl_exact_tile publishes it */
    int exact;
    const double *sa, *sb;  /* NULL: integers, written as they are */
    const int64_t *zca, *za, *zb, *sqb;  /* zero-point terms added first (NULL: none) */
    double *row_sq, peak;   /* per row: its sum of squares, added in column order */
};

mpl_estimate_ctx *mpl_exact_begin(size_t m, const double *sa, const double *sb, const int64_t *zca,
                                  const int64_t *za, const int64_t *zb, const int64_t *sqb)
{
    mpl_estimate_ctx *c = aligned_alloc(64, sizeof *c);
    if (!c)
        return NULL;
    memset(c, 0, sizeof *c);
    c->row_sq = calloc(m ? m : 1, sizeof(double));
    if (!c->row_sq) {
        free(c);
        return NULL;
    }
    c->exact = 1, c->m = m, c->sa = sa, c->sb = sb;
    c->zca = zca, c->za = za, c->zb = zb, c->sqb = sqb;
    return c;
}

/* The exact mode's block: mpl_exact_tile's operations in its order (a row's squares added by
 * ascending column, rows added in order at the end), so the same bits. */
static void exact_block(mpl_estimate_ctx *c, size_t i, size_t j0, size_t nb, const int64_t *row, void *out)
{
    double rs = c->row_sq[i], pk = c->peak;
    const uint64_t ca = c->zb ? (uint64_t)c->zca[i] : 0, cz = c->zb ? (uint64_t)c->za[i] : 0;
    const int64_t *zb = c->zb ? c->zb + j0 : NULL, *sqb = c->zb ? c->sqb + j0 : NULL;
    for (size_t j = 0; j < nb; j++) {
        uint64_t e = (uint64_t)row[j];
        if (zb)
            e += ca * (uint64_t)zb[j] + cz * (uint64_t)sqb[j];
        double y;
        if (c->sa) {
            y = ((double)(int64_t)e * c->sa[i]) * c->sb[j0 + j];
            ((double *)out)[j] = y;
        } else {
            ((int64_t *)out)[j] = (int64_t)e;
            y = (double)(int64_t)e;
        }
        rs += y * y;
        double ay = fabs(y);
        pk = ay > pk ? ay : pk;
    }
    c->row_sq[i] = rs;
    c->peak = pk;
}

mpl_estimate_ctx *mpl_estimate_begin(size_t m, size_t n, int64_t k, double round_rel, const mpl_side *a,
                                     const mpl_side *b, int integer, int scaled)
{
    mpl_estimate_ctx *c = aligned_alloc(64, sizeof *c);  /* its vectors are 64-byte aligned */
    if (!c)
        return NULL;
    memset(c, 0, sizeof *c);
    c->gtb = malloc((n ? n : 1) * sizeof(double));
    c->sq = aligned_alloc(64, (m ? m : 1) * sizeof(mpl_v8d));
    if (!c->gtb || !c->sq) {
        mpl_estimate_end(c, NULL);
        return NULL;
    }
    memset(c->sq, 0, (m ? m : 1) * sizeof(mpl_v8d));
    c->a = a, c->b = b, c->m = m, c->n = n;
    c->kd = (double)k, c->round_rel = round_rel, c->integer = integer, c->scaled = scaled;
    for (size_t j = 0; j < n; j++)
        c->gtb[j] = b->alpha[j] * b->ta[j];
    return c;
}

/* Columns j0..j0+nb (nb <= MPL_BLOCK) of row i: the estimate of acc values ``row`` into ``out``
 * (int64 for integers, else float64; it may be row's own memory: row is read whole first). */
MPL_CLONES
void mpl_estimate_block(mpl_estimate_ctx *c, size_t i, size_t j0, size_t nb, const int64_t *row, void *out)
{
    if (c->exact) {
        exact_block(c, i, j0, nb, row, out);
        return;
    }
    const mpl_side *a = c->a, *b = c->b;
    const double kd = c->kd, al = a->alpha[i], alta = a->alpha[i] * a->ta[i], ba = a->b[i];
    const double sa = a->scale ? a->scale[i] : 1.0;
    const double *restrict b_alpha = b->alpha + j0, *restrict b_b = b->b + j0, *restrict gtb = c->gtb + j0;
    const double *restrict b_scale = b->scale ? b->scale + j0 : NULL;
    double sl[MPL_BLOCK], y[MPL_BLOCK], f[MPL_BLOCK];
    int64_t xi[MPL_BLOCK];
    mpl_lanes lanes = {c->sq[i], c->top, c->most, 0.0};
    if (c->integer) {
        /* whole lanes in registers: fitted, round_even and lanes_add of a lane at a time (the same
         * operations in the same order, so the same bits), stored as they come; the rest as below */
        const size_t whole = nb - nb % MPL_LANES;
        int64_t *o = out;
        for (size_t j = 0; j < whole; j += MPL_LANES) {
            mpl_v8l acc8;
            mpl_v8d ga, bb, g;
            memcpy(&acc8, row + j, sizeof acc8);
            memcpy(&ga, b_alpha + j, sizeof ga);
            memcpy(&bb, b_b + j, sizeof bb);
            memcpy(&g, gtb + j, sizeof g);
            const mpl_v8d t1 = (__builtin_convertvector(acc8, mpl_v8d) * al) * ga;
            const mpl_v8d t2 = alta * bb, t3 = ba * g, t4 = kd * (ba * bb);
            const mpl_v8d mag = ((MPL_VABS(t1) + MPL_VABS(t2)) + MPL_VABS(t3)) + MPL_VABS(t4);
            mpl_v8d x = ((t1 + t2) + t3) + t4;
            vround_even(&x);
            lanes.sq += x * x;
            lanes.top = MPL_VMAX(lanes.top, MPL_VABS(x));
            lanes.most = MPL_VMAX(lanes.most, mag);
            if (o) {
                const mpl_v8l xv = __builtin_convertvector(x, mpl_v8l);
                memcpy(o + j, &xv, sizeof xv);
            }
        }
        for (size_t j = whole; j < nb; j++) {
            const double x = round_even(fitted(row[j], al, alta, ba, b_alpha[j], b_b[j], gtb[j], kd, &sl[j]));
            xi[j] = (int64_t)x;
            y[j] = x;
        }
        lanes_add(&lanes, y + whole, sl + whole, nb - whole);
        if (o) memcpy(o + whole, xi + whole, (nb - whole) * sizeof(int64_t));
    } else {
        for (size_t j = 0; j < nb; j++)
            f[j] = fitted(row[j], al, alta, ba, b_alpha[j], b_b[j], gtb[j], kd, &sl[j]);
        if (b_scale) {
            const double round_rel = c->round_rel;
            for (size_t j = 0; j < nb; j++) {
                const double s = sa * b_scale[j];
                y[j] = (f[j] * sa) * b_scale[j];
                sl[j] = (round_rel * sl[j]) * s;
            }
            lanes_add(&lanes, y, sl, nb);
        } else {
            lanes_add(&lanes, f, sl, nb);
        }
        if (out) memcpy(out, c->scaled && b_scale ? y : f, nb * sizeof(double));
    }
    c->sq[i] = lanes.sq;
    c->top = lanes.top;
    c->most = lanes.most;
}

void mpl_estimate_end(mpl_estimate_ctx *c, mpl_tile_sums *sums)
{
    if (c->exact) {
        if (sums) {
            double sq = 0.0;
            for (size_t i = 0; i < c->m; i++)
                sq += c->row_sq[i];
            sums->bound = 0.0, sums->estimate_sq = sq, sums->peak = c->peak;
        }
        free(c->row_sq);
        free(c);
        return;
    }
    if (sums) {
        mpl_lanes lanes = {{0.0}, c->top, c->most, 0.0};
        for (size_t i = 0; i < c->m; i++) {   /* rows in order, as a whole pass adds them */
            lanes.sq = c->sq[i];
            lanes_row_end(&lanes);
        }
        double est_sq, peak, slack_max;
        lanes_total(&lanes, &est_sq, &peak, &slack_max);
        /* the rounding allowance only; the caller adds the radius */
        sums->bound = c->b->scale && !c->integer ? slack_max : c->round_rel * slack_max;
        sums->estimate_sq = est_sq;
        sums->peak = peak;
    }
    free(c->gtb);
    free(c->sq);
    free(c);
}

void mpl_estimate_rows(mpl_estimate_ctx *c, size_t i0, size_t j0, const int64_t *acc, ptrdiff_t ld_acc,
                       void *out, ptrdiff_t ld_out, size_t m, size_t n)
{
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j += MPL_BLOCK) {
            const size_t nb = n - j < MPL_BLOCK ? n - j : MPL_BLOCK;
            mpl_estimate_block(c, i0 + i, j0 + j, nb, acc + (ptrdiff_t)i * ld_acc + (ptrdiff_t)j,
                               out ? (void *)((int64_t *)out + (ptrdiff_t)i * ld_out + (ptrdiff_t)j) : NULL);
        }
}

void mpl_estimate_fast(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k,
                       double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                       double *est_f, int64_t *est_i, ptrdiff_t ld_out, int scaled, mpl_tile_sums *sums)
{
    mpl_estimate_ctx *c = mpl_estimate_begin(m, n, k, round_rel, a, b, integer, scaled);
    if (!c) {
        sums->bound = -1.0;   /* the caller raises MemoryError */
        return;
    }
    mpl_estimate_rows(c, 0, 0, acc, ld_acc, integer ? (void *)est_i : (void *)est_f, ld_out, m, n);
    mpl_estimate_end(c, sums);
}
