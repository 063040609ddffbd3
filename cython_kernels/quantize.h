/* Fused quantise-and-encode of one operand block (mpilayer/io/operand_readers.py, core/layered.py).
 *
 * mpl_quantize_encode: q' = clip(rint(x / s), -qmax, qmax) - z for a float32/float64 block,
 * stored as int8 (bits <= 8) or int16 (two's complement, wrapping like numpy's in-place
 * subtraction in that dtype), and, in the same pass over each row, the wire form of any number
 * of bit fields of q' (protocol.encode_component): fields of width <= 3 as bit planes packed
 * MSB first over the flattened block, plane after plane (numpy.packbits(axis=None) of the
 * stacked planes), wider ones as uint8/uint16. Division, not a reciprocal; rounding half to even
 * (numpy.rint) by the 2**52 addition, exact in IEEE double for |y| < 2**52.
 *
 * mpl_encode_fields: the same encoding of an int8/int16 block already quantised.
 *
 * Scales: s_rows (per row), s_cols (per column) or the scalar s0; zero points: z_rows, z_cols
 * or none. Every output packed-plane buffer must be zeroed by the caller.
 */
#ifndef MPILAYER_QUANTIZE_H
#define MPILAYER_QUANTIZE_H

#include <stddef.h>
#include <stdint.h>

#define MPL_MAX_FIELDS 16

typedef struct {
    int n;                        /* number of fields */
    int lo[MPL_MAX_FIELDS];       /* lowest bit */
    int width[MPL_MAX_FIELDS];    /* bits; <= 3: packed planes, <= 8: uint8, else uint16 */
    void *out[MPL_MAX_FIELDS];    /* output buffers */
} mpl_fields;

/* Returns 0, or -1 if a row buffer could not be allocated. ``simd``: 1 takes the AVX-512 loop
 * where the CPU has it (mpl_quantize_simd), 0 the portable one; both give the same bits. */
int mpl_quantize_encode(const void *x, int x_is_double, size_t rows, size_t cols, ptrdiff_t ldx,
                        double s0, const double *s_rows, const double *s_cols,
                        const int64_t *z_rows, const int64_t *z_cols, int qmax,
                        void *q, int q_elsize, const mpl_fields *fields, int simd);

/* 1 if mpl_quantize_encode(..., simd=1) runs the AVX-512 loop on this CPU, else 0. */
int mpl_quantize_simd(void);

int mpl_encode_fields(const void *q, int q_elsize, size_t rows, size_t cols, ptrdiff_t ldq,
                      const mpl_fields *fields);

/* The exact tile as published (master.py): e_ij = acc_ij + zca_i zb_j + za_i sqb_j (int64,
 * wrapping like numpy's estimates.exact_product), then out_f = ((double)e_ij * sa_i) * sb_j
 * (numpy's acc * sa[:, None] * sb[None, :]), or out_i = e_ij without scales (sa == NULL);
 * *est_sq = sum of squares and *peak = max |.| of what is stored (in double). zca/za/zb/sqb may
 * be NULL (no zero points). The scaling and sums are the estimate pass's exact mode
 * (estimates.h, mpl_exact_begin): the same bits as a kernel that writes the exact tile in its
 * flush. Returns 0, or -1 if out of memory. */
int mpl_exact_tile(const int64_t *acc, size_t m, size_t n, const int64_t *zca, const int64_t *za,
                   const int64_t *zb, const int64_t *sqb, const double *sa, const double *sb,
                   double *out_f, int64_t *out_i, double *est_sq, double *peak);

/* The int8 kernels' digits of a bit field of ``count`` int8/int16 values q (elsize 1 or 2), in
 * one pass: x = bits lo..lo+width-1 of q (sign-extended when ``sign``: q holds sign-extended
 * values and the field is their top), digit t = (x >> d*t) & (2^d - 1) for t < n-1, the top
 * digit x >> d*(n-1) (masked to the field unless ``sign``), each XORed with flip[t] and stored
 * as its low byte in out[t]. */
void mpl_field_digits(const void *q, int elsize, size_t count, int lo, int width, int sign, int d, int n,
                      const unsigned *flip, uint8_t *const *out);

#endif
