/* Operand sums and elementwise passes of mpilayer's resolution estimates (mpilayer/estimates.py).
 *
 * mpl_line_sums: per row (or column) of an int8/int16 block of q', the sums SideStats keeps.
 * mpl_estimate_tile: one tile's reported estimate, its certified integer interval, bound and
 * sums (the formulas and their rounding allowances are derived in estimates.py; this is the
 * only implementation). mpl_estimate_fast: the estimate and sums alone, for publishing.
 * Every result is the same bit for bit on every SIMD clone and the portable build; the sum of
 * squares adds in a fixed order of its own (estimates.c, lanes_add), not element by element.
 */
#ifndef MPILAYER_ESTIMATES_H
#define MPILAYER_ESTIMATES_H

#include <stddef.h>
#include <stdint.h>

/* The sums of estimates.SideStats in one pass over a block of q' (elsize 1 or 2, row stride ld):
 * per row, or with ``columns`` per column of the stored block (its lines: ``length`` of them),
 * into out (MPL_SUMS_FIXED + 5 * n_shifts rows of ``length`` int64, added to; qmin/qmax rows
 * combined with min/max): sq, sqq, sabs, sabs_full (|q' + z|), qmin, qmax, pos, neg, then per
 * shift s: sd, sdd, sqd, pos and neg of T = q' - d, with d = q' & (2**s - 1). Exact integer sums. */
#define MPL_SUMS_FIXED 8
/* With ``shifted`` (not NULL, row stride ld_shifted, the block's layout), q is the block before its
 * zero points: q' = q - z (in q's type, wrapping as numpy does) is written there and summed, in the
 * same pass. Returns 0, or -1 if a buffer could not be allocated. */
int mpl_line_sums(const void *q, int elsize, size_t rows, size_t cols, ptrdiff_t ld, int columns,
                  const int64_t *zero, const int *shifts, int n_shifts, int64_t *out, size_t length,
                  void *shifted, ptrdiff_t ld_shifted);

/* Per line (as in mpl_line_sums) of an int8/int16 block: sum, min and max (the inputs of the zero
 * points) into out's 3 rows of ``length`` int64, combined with what they hold (sum added, min/max
 * kept). Returns 0, or -1 if a buffer could not be allocated. */
int mpl_line_range(const void *q, int elsize, size_t rows, size_t cols, ptrdiff_t ld, int columns,
                   int64_t *out, size_t length);

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

/* scaled: est_f holds the scaled estimate (est * sa_i) * sb_j, as published, instead of the
 * integer-unit one (real inputs only). est_f/est_i may overlay acc itself (same row stride).
 * The same pass in pieces, for a kernel that writes the estimate in its own pass over C:
 * mpl_estimate_begin (NULL: no memory), mpl_estimate_block for every row segment (by ascending
 * column within a row, each starting at a multiple of 8 columns, at most 512 long; ``out``: int64
 * for integers, else float64, may be ``row`` itself), mpl_estimate_end (sums: NULL to discard). */
typedef struct mpl_estimate_ctx mpl_estimate_ctx;
mpl_estimate_ctx *mpl_estimate_begin(size_t m, size_t n, int64_t k, double round_rel, const mpl_side *a,
                                     const mpl_side *b, int integer, int scaled);
void mpl_estimate_block(mpl_estimate_ctx *c, size_t i, size_t j0, size_t nb, const int64_t *row, void *out);
void mpl_estimate_end(mpl_estimate_ctx *c, mpl_tile_sums *sums);
/* mpl_estimate_block over every row of the m x n block of the product at row i0, column j0 (rows
 * in order), in segments: ``acc`` (row stride ld_acc) into ``out`` (8-byte elements, row stride
 * ld_out; NULL: nothing stored; may be acc). */
void mpl_estimate_rows(mpl_estimate_ctx *c, size_t i0, size_t j0, const int64_t *acc, ptrdiff_t ld_acc,
                       void *out, ptrdiff_t ld_out, size_t m, size_t n);
/* The exact mode of the same pass: each block of the int64 product, plus the zero-point terms
 * zca_i zb_j + za_i sqb_j (zb NULL: none; mod 2^64), written as the exact tile is published,
 * ``(e * sa_i) * sb_j`` (float64; sa NULL: the int64 values), with its sum of squares (each row
 * by ascending column, the rows in order) and peak (bound 0): mpl_exact_tile, and the int8
 * kernels' flush (which adds the zero-point terms in its start). */
mpl_estimate_ctx *mpl_exact_begin(size_t m, const double *sa, const double *sb, const int64_t *zca,
                                  const int64_t *za, const int64_t *zb, const int64_t *sqb);
void mpl_estimate_fast(const int64_t *acc, ptrdiff_t ld_acc, size_t m, size_t n, int64_t k,
                       double round_rel, const mpl_side *a, const mpl_side *b, int integer,
                       double *est_f, int64_t *est_i, ptrdiff_t ld_out, int scaled, mpl_tile_sums *sums);

#endif
