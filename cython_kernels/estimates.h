/* Elementwise passes of mpilayer's resolution estimates (see mpilayer/estimates.py).
 *
 * mpl_row_histograms: per row (or column) of an int8 block, how often each of the 256 values
 * occurs: every sum the estimates need is a weighted count of these.
 * mpl_estimate_tile: one tile's reported estimate, its certified integer interval, bound and
 * sums (the formulas and their rounding allowances are derived in estimates.py; this is the
 * only implementation). mpl_estimate_fast: the estimate and sums alone, for publishing.
 */
#ifndef MPILAYER_ESTIMATES_H
#define MPILAYER_ESTIMATES_H

#include <stddef.h>
#include <stdint.h>

void mpl_row_histograms(const int8_t *q, size_t rows, size_t cols, ptrdiff_t row_stride,
                        ptrdiff_t col_stride, int64_t *counts);

/* Per row i of A (length m) and column j of B (length n). */
typedef struct {
    const double *alpha, *ta, *b;                  /* fit slope, rowsum(T), offset beta + z */
    const double *dinf, *r2, *h1, *h2, *q1, *q2;   /* certified norms (estimates.py) */
    const int64_t *pos_full, *neg_full, *pos_trunc, *neg_trunc;  /* truncation side sums */
    const int64_t *zc, *z;                         /* zero-point terms: Z_ij = zc_i w_j + z_i s_j */
    const double *scale;                           /* NULL: integer units */
} mpl_side;

typedef struct {
    double bound, estimate_sq, peak;
} mpl_tile_sums;

void mpl_estimate_tile(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k, int64_t delta,
                       double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                       double *est_f, int64_t *est_i, int64_t *lo, int64_t *hi, ptrdiff_t ld_out,
                       mpl_tile_sums *sums);

void mpl_estimate_fast(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k,
                       double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                       double *est_f, int64_t *est_i, ptrdiff_t ld_out, mpl_tile_sums *sums);

#endif
