/* Bit-plane packing and popcount matrix products.
 *
 * A plane of an integer matrix is one bit of every element's two's-complement
 * representation, packed 64 elements per uint64 word along the reduction
 * dimension k: bit t of word w is element 64*w + t.  For two planes packed
 * along k, the bit-level dot product of row i and column j is
 *     sum_w popcount(Xp[i, w] & Yp[j, w]).
 *
 * Every entry point has a portable C body and, on x86-64, an AVX2 body chosen
 * at run time (cpu_dispatch.h); the product also has an AVX-512 VPOPCNTDQ
 * body.  All give bit-identical results.
 */
#include <stdlib.h>
#include <string.h>

#include "bitplanes.h"
#include "cpu_dispatch.h"
#include "estimates.h"

#if MPL_X86
#include <immintrin.h>
#endif

#define MPL_ALWAYS_INLINE static inline __attribute__((always_inline))

/* Words per packed row: ceil(k/64) rounded up to a multiple of 4 (one 256-bit
 * vector) so that the SIMD kernels have no word tail, plus 4 more whenever the
 * row stride would be a multiple of 4 KiB (rows that alias the same L1 sets
 * make the register-tiled kernels thrash). */
size_t mpl_plane_words(size_t k)
{
    size_t w = (k + 63) / 64;
    w = (w + 3) & ~(size_t)3;
    if (w > 0 && (w * 8) % 4096 == 0)
        w += 4;
    return w;
}

/* Load 8 bytes as a little-endian uint64 (byte j -> bits 8j..8j+7). */
MPL_ALWAYS_INLINE uint64_t load_le64(const uint8_t *p)
{
    uint64_t x;
    memcpy(&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x);
#endif
    return x;
}

/* Bit `bb` of each of the 8 bytes of x, gathered into an 8-bit value (byte j
 * -> bit j).  After masking, byte j's bit sits at position 8j; multiplying by
 * sum_j 2^(56-7j) = 0x0102040810204080 moves it to 56+j, and all other
 * partial products land on distinct positions (8j-7j' = 8a-7a' forces j=a,
 * j'=a' for j, j', a, a' in 0..7), so there are no carries into bits 56..63. */
MPL_ALWAYS_INLINE uint64_t gather_bits8(uint64_t x, int bb)
{
    return (((x >> bb) & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56;
}

/* Split 64 int16 elements into their low and high bytes. */
static void split_bytes16(const uint8_t *src, uint8_t *lo, uint8_t *hi, size_t count)
{
    for (size_t t = 0; t < count; ++t) {
        uint16_t v;
        memcpy(&v, src + 2 * t, 2);
        lo[t] = (uint8_t)(v & 0xff);
        hi[t] = (uint8_t)(v >> 8);
    }
}

/* ---------------------------------------------------------------- rows --- */

/* Portable row packer: per 64-element chunk, gather the byte holding the
 * wanted bit (int16: low or high byte) then 8 multiply-gathers per word. */
static void pack_rows_c(const uint8_t *X, int elsize, size_t m, size_t k,
                        int low_bit, int n_planes, uint64_t *out, size_t W)
{
    const size_t kw = (k + 63) / 64;
    uint8_t buf[2][64];
    for (size_t i = 0; i < m; ++i) {
        const uint8_t *row = X + i * k * (size_t)elsize;
        for (size_t w = 0; w < kw; ++w) {
            size_t cnt = k - 64 * w < 64 ? k - 64 * w : 64;
            memset(buf, 0, sizeof buf);
            if (elsize == 1)
                memcpy(buf[0], row + 64 * w, cnt);
            else
                split_bytes16(row + 128 * w, buf[0], buf[1], cnt);
            for (int p = 0; p < n_planes; ++p) {
                int b = low_bit + p;
                const uint8_t *src = buf[b >> 3];
                uint64_t word = 0;
                for (int g = 0; g < 8; ++g)
                    word |= gather_bits8(load_le64(src + 8 * g), b & 7) << (8 * g);
                out[((size_t)p * m + i) * W + w] = word;
            }
        }
        for (int p = 0; p < n_planes; ++p)
            for (size_t w = kw; w < W; ++w)
                out[((size_t)p * m + i) * W + w] = 0;
    }
}

#if MPL_X86
/* 32 int16 (two ymm) -> their 32 low bytes and 32 high bytes, in order. */
MPL_TARGET_AVX2 static inline void split16_avx2(__m256i a, __m256i b, __m256i *lo, __m256i *hi)
{
    /* per 128-bit lane: 8 low bytes then 8 high bytes */
    const __m256i ctl = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    __m256i sa = _mm256_shuffle_epi8(a, ctl), sb = _mm256_shuffle_epi8(b, ctl);
    /* lanes now hold [a0-7|b0-7 ... ] out of order: fix with a qword permute */
    *lo = _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(sa, sb), 0xD8);
    *hi = _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(sa, sb), 0xD8);
}

/* Bit `bb` of each of 32 bytes -> 32-bit mask: a 16-bit-lane shift by 7-bb
 * moves bit bb of every byte to that byte's bit 7 (bits crossing a byte
 * boundary land below bit 7 of the next byte), and movemask collects bit 7. */
MPL_TARGET_AVX2 static inline uint32_t bits32_avx2(__m256i v, int bb)
{
    return (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(v, _mm_cvtsi32_si128(7 - bb)));
}

MPL_TARGET_AVX2 static void pack_rows_avx2(const uint8_t *X, int elsize, size_t m, size_t k,
                                           int low_bit, int n_planes, uint64_t *out, size_t W)
{
    const size_t kw = (k + 63) / 64;
    uint8_t tail[128];
    for (size_t i = 0; i < m; ++i) {
        const uint8_t *row = X + i * k * (size_t)elsize;
        for (size_t w = 0; w < kw; ++w) {
            const uint8_t *src = row + 64 * w * (size_t)elsize;
            if (64 * (w + 1) > k) { /* last, partial chunk: zero-extend */
                memset(tail, 0, sizeof tail);
                memcpy(tail, src, (k - 64 * w) * (size_t)elsize);
                src = tail;
            }
            __m256i v[2][2]; /* [byte: lo/hi][half of the 64 elements] */
            if (elsize == 1) {
                v[0][0] = _mm256_loadu_si256((const __m256i *)src);
                v[0][1] = _mm256_loadu_si256((const __m256i *)(src + 32));
                v[1][0] = v[1][1] = _mm256_setzero_si256();
            } else {
                for (int h = 0; h < 2; ++h)
                    split16_avx2(_mm256_loadu_si256((const __m256i *)(src + 64 * h)),
                                 _mm256_loadu_si256((const __m256i *)(src + 64 * h + 32)),
                                 &v[0][h], &v[1][h]);
            }
            for (int p = 0; p < n_planes; ++p) {
                int b = low_bit + p;
                uint64_t word = (uint64_t)bits32_avx2(v[b >> 3][0], b & 7) |
                                (uint64_t)bits32_avx2(v[b >> 3][1], b & 7) << 32;
                out[((size_t)p * m + i) * W + w] = word;
            }
        }
        for (int p = 0; p < n_planes; ++p)
            for (size_t w = kw; w < W; ++w)
                out[((size_t)p * m + i) * W + w] = 0;
    }
}
#endif

void mpl_pack_rows(const void *X, int elsize, size_t m, size_t k, int low_bit,
                   int n_planes, uint64_t *out, size_t W, int method)
{
#if MPL_X86
    if (method == MPL_METHOD_AVX2 && mpl_cpu_avx2()) {
        pack_rows_avx2((const uint8_t *)X, elsize, m, k, low_bit, n_planes, out, W);
        return;
    }
#endif
    (void)method;
    pack_rows_c((const uint8_t *)X, elsize, m, k, low_bit, n_planes, out, W);
}

/* ------------------------------------------------------------- columns --- */
/* Column packing is a bit transpose.  For a tile of 64 rows (one output word)
 * and a few columns, with v_r the bytes of row r:
 *     M_g = OR_{r<8} ((v_{8g+r} >> bb) & 1) << r          (bytewise)
 * so byte c of M_g is byte g of column c's output word; a byte transpose of
 * M_0..M_7 then yields each column's word.  Rows are first copied into a
 * small contiguous tile (Y's row stride is often a power of two, which would
 * make 64 strided rows fight over two L1 sets when reread for every plane). */

/* Portable: 8 columns per tile (one uint64 of bytes per row). */
static void pack_cols_c(const uint8_t *Y, int elsize, size_t k, size_t n, int low_bit,
                        int n_planes, uint64_t *out, size_t W)
{
    const size_t kw = (k + 63) / 64;
    uint8_t tile[2][64][8];
    for (size_t c0 = 0; c0 < n; c0 += 8) {
        size_t nc = n - c0 < 8 ? n - c0 : 8;
        for (size_t w = 0; w < kw; ++w) {
            size_t nr = k - 64 * w < 64 ? k - 64 * w : 64;
            memset(tile, 0, sizeof tile);
            for (size_t r = 0; r < nr; ++r) {
                const uint8_t *src = Y + ((64 * w + r) * n + c0) * (size_t)elsize;
                if (elsize == 1)
                    memcpy(tile[0][r], src, nc);
                else
                    split_bytes16(src, tile[0][r], tile[1][r], nc);
            }
            for (int p = 0; p < n_planes; ++p) {
                int b = low_bit + p, bb = b & 7;
                uint64_t M[8];
                for (int g = 0; g < 8; ++g) {
                    uint64_t acc = 0;
                    for (int r = 0; r < 8; ++r)
                        acc |= ((load_le64(tile[b >> 3][8 * g + r]) >> bb) & 0x0101010101010101ULL) << r;
                    M[g] = acc;
                }
                for (size_t c = 0; c < nc; ++c) {
                    uint64_t word = 0;
                    for (int g = 0; g < 8; ++g)
                        word |= ((M[g] >> (8 * c)) & 0xff) << (8 * g);
                    out[((size_t)p * n + c0 + c) * W + w] = word;
                }
            }
        }
    }
    for (int p = 0; p < n_planes; ++p)
        for (size_t j = 0; j < n; ++j)
            for (size_t w = kw; w < W; ++w)
                out[((size_t)p * n + j) * W + w] = 0;
}

#if MPL_X86
/* AVX2: 32 columns per tile (one ymm of bytes per row). */
MPL_TARGET_AVX2 static void pack_cols_avx2(const uint8_t *Y, int elsize, size_t k, size_t n,
                                           int low_bit, int n_planes, uint64_t *out, size_t W)
{
    const size_t kw = (k + 63) / 64;
    const __m256i one = _mm256_set1_epi8(1);
    /* tile[byte][row][col]: byte 0 = the int8 value or the int16 low byte */
    uint8_t tile[2][64][32] __attribute__((aligned(32)));
    int need_hi = elsize == 2 && low_bit + n_planes - 1 >= 8;
    for (size_t c0 = 0; c0 < n; c0 += 32) {
        size_t nc = n - c0 < 32 ? n - c0 : 32;
        for (size_t w = 0; w < kw; ++w) {
            size_t nr = k - 64 * w < 64 ? k - 64 * w : 64;
            for (size_t r = 0; r < 64; ++r) {
                const uint8_t *src = Y + ((64 * w + (r < nr ? r : 0)) * n + c0) * (size_t)elsize;
                if (r >= nr) {
                    _mm256_store_si256((__m256i *)tile[0][r], _mm256_setzero_si256());
                    _mm256_store_si256((__m256i *)tile[1][r], _mm256_setzero_si256());
                } else if (nc < 32) {
                    memset(tile[0][r], 0, 32);
                    memset(tile[1][r], 0, 32);
                    if (elsize == 1)
                        memcpy(tile[0][r], src, nc);
                    else
                        split_bytes16(src, tile[0][r], tile[1][r], nc);
                } else if (elsize == 1) {
                    _mm256_store_si256((__m256i *)tile[0][r], _mm256_loadu_si256((const __m256i *)src));
                } else {
                    __m256i lo, hi;
                    split16_avx2(_mm256_loadu_si256((const __m256i *)src),
                                 _mm256_loadu_si256((const __m256i *)(src + 32)), &lo, &hi);
                    _mm256_store_si256((__m256i *)tile[0][r], lo);
                    if (need_hi)
                        _mm256_store_si256((__m256i *)tile[1][r], hi);
                }
            }
            for (int p = 0; p < n_planes; ++p) {
                int b = low_bit + p;
                const __m128i cnt = _mm_cvtsi32_si128(b & 7);
                __m256i M[8];
                for (int g = 0; g < 8; ++g) {
                    const uint8_t(*t)[32] = tile[b >> 3] + 8 * g;
                    /* ((v >> bb) & 1) << r, bytewise: the 16-bit shifts are
                     * safe because the mask keeps one bit per byte, and
                     * shifting it left by r < 8 stays inside its byte. */
#define MPL_ROWBIT(r) _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(_mm256_load_si256((const __m256i *)t[r]), cnt), one), r)
                    M[g] = _mm256_or_si256(
                        _mm256_or_si256(_mm256_or_si256(MPL_ROWBIT(0), MPL_ROWBIT(1)),
                                        _mm256_or_si256(MPL_ROWBIT(2), MPL_ROWBIT(3))),
                        _mm256_or_si256(_mm256_or_si256(MPL_ROWBIT(4), MPL_ROWBIT(5)),
                                        _mm256_or_si256(MPL_ROWBIT(6), MPL_ROWBIT(7))));
#undef MPL_ROWBIT
                }
                /* byte transpose (within each 128-bit lane): 8 x 16 -> 16 x 8 */
                __m256i a0 = _mm256_unpacklo_epi8(M[0], M[1]), a1 = _mm256_unpackhi_epi8(M[0], M[1]);
                __m256i a2 = _mm256_unpacklo_epi8(M[2], M[3]), a3 = _mm256_unpackhi_epi8(M[2], M[3]);
                __m256i a4 = _mm256_unpacklo_epi8(M[4], M[5]), a5 = _mm256_unpackhi_epi8(M[4], M[5]);
                __m256i a6 = _mm256_unpacklo_epi8(M[6], M[7]), a7 = _mm256_unpackhi_epi8(M[6], M[7]);
                __m256i b0 = _mm256_unpacklo_epi16(a0, a2), b1 = _mm256_unpackhi_epi16(a0, a2);
                __m256i b2 = _mm256_unpacklo_epi16(a1, a3), b3 = _mm256_unpackhi_epi16(a1, a3);
                __m256i b4 = _mm256_unpacklo_epi16(a4, a6), b5 = _mm256_unpackhi_epi16(a4, a6);
                __m256i b6 = _mm256_unpacklo_epi16(a5, a7), b7 = _mm256_unpackhi_epi16(a5, a7);
                uint64_t words[8][4] __attribute__((aligned(32)));
                /* words[x] = columns (2x, 2x+1, 16+2x, 17+2x) */
                _mm256_store_si256((__m256i *)words[0], _mm256_unpacklo_epi32(b0, b4));
                _mm256_store_si256((__m256i *)words[1], _mm256_unpackhi_epi32(b0, b4));
                _mm256_store_si256((__m256i *)words[2], _mm256_unpacklo_epi32(b1, b5));
                _mm256_store_si256((__m256i *)words[3], _mm256_unpackhi_epi32(b1, b5));
                _mm256_store_si256((__m256i *)words[4], _mm256_unpacklo_epi32(b2, b6));
                _mm256_store_si256((__m256i *)words[5], _mm256_unpackhi_epi32(b2, b6));
                _mm256_store_si256((__m256i *)words[6], _mm256_unpacklo_epi32(b3, b7));
                _mm256_store_si256((__m256i *)words[7], _mm256_unpackhi_epi32(b3, b7));
                uint64_t *dst = out + ((size_t)p * n + c0) * W + w;
                if (nc == 32) {
                    for (int x = 0; x < 8; ++x) {
                        dst[(2 * x) * W] = words[x][0];
                        dst[(2 * x + 1) * W] = words[x][1];
                        dst[(16 + 2 * x) * W] = words[x][2];
                        dst[(17 + 2 * x) * W] = words[x][3];
                    }
                } else {
                    for (size_t c = 0; c < nc; ++c) {
                        size_t lane = c >> 4, cc = c & 15;
                        dst[c * W] = words[cc >> 1][2 * lane + (cc & 1)];
                    }
                }
            }
        }
    }
    for (int p = 0; p < n_planes; ++p)
        for (size_t j = 0; j < n; ++j)
            for (size_t w = kw; w < W; ++w)
                out[((size_t)p * n + j) * W + w] = 0;
}
#endif

void mpl_pack_cols(const void *Y, int elsize, size_t k, size_t n, int low_bit,
                   int n_planes, uint64_t *out, size_t W, int method)
{
#if MPL_X86
    if (method == MPL_METHOD_AVX2 && mpl_cpu_avx2()) {
        pack_cols_avx2((const uint8_t *)Y, elsize, k, n, low_bit, n_planes, out, W);
        return;
    }
#endif
    (void)method;
    pack_cols_c((const uint8_t *)Y, elsize, k, n, low_bit, n_planes, out, W);
}

/* ------------------------------------------------------ popcount GEMM --- */
/* Loop nest (both paths): word blocks of KB words (so a row panel stays in
 * L1), column blocks of NB packed Y rows (NB*KB*8 bytes ~ half of L2), then
 * register tiles of MR x NR (X rows x Y rows).  Edge tiles reuse a valid row
 * pointer for the missing rows and drop those results.  Counts are added to C
 * as weight*count with unsigned (mod 2^64) arithmetic: no signed-overflow UB;
 * the result is exact whenever the true value fits in int64. */

#define PC_KB 512          /* words per k block: 4 KiB per row */
#define PC_L2_BYTES (256 * 1024)

MPL_ALWAYS_INLINE void add_weighted(int64_t *C, ptrdiff_t ldc, size_t i, size_t j,
                                    int64_t weight, uint64_t count)
{
    int64_t *c = C + (ptrdiff_t)i * ldc + (ptrdiff_t)j;
    *c = (int64_t)((uint64_t)*c + (uint64_t)weight * count);
}

/* Portable tile: 2 X rows x 4 Y rows, 8 scalar accumulators. */
#define PC_C_MR 2
#define PC_C_NR 4
MPL_ALWAYS_INLINE void pc_tile_c_body(const uint64_t *const *xr, const uint64_t *const *yr,
                                      size_t kw, uint64_t *cnt)
{
    uint64_t a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
    const uint64_t *x0 = xr[0], *x1 = xr[1];
    const uint64_t *y0 = yr[0], *y1 = yr[1], *y2 = yr[2], *y3 = yr[3];
    for (size_t w = 0; w < kw; ++w) {
        uint64_t u0 = x0[w], u1 = x1[w], v0 = y0[w], v1 = y1[w], v2 = y2[w], v3 = y3[w];
        a00 += (uint64_t)__builtin_popcountll(u0 & v0);
        a01 += (uint64_t)__builtin_popcountll(u0 & v1);
        a02 += (uint64_t)__builtin_popcountll(u0 & v2);
        a03 += (uint64_t)__builtin_popcountll(u0 & v3);
        a10 += (uint64_t)__builtin_popcountll(u1 & v0);
        a11 += (uint64_t)__builtin_popcountll(u1 & v1);
        a12 += (uint64_t)__builtin_popcountll(u1 & v2);
        a13 += (uint64_t)__builtin_popcountll(u1 & v3);
    }
    cnt[0] = a00; cnt[1] = a01; cnt[2] = a02; cnt[3] = a03;
    cnt[4] = a10; cnt[5] = a11; cnt[6] = a12; cnt[7] = a13;
}

typedef void (*pc_tile_fn)(const uint64_t *const *, const uint64_t *const *, size_t, uint64_t *);

static void pc_tile_c_generic(const uint64_t *const *xr, const uint64_t *const *yr, size_t kw, uint64_t *cnt)
{
    pc_tile_c_body(xr, yr, kw, cnt);
}

#if MPL_X86
/* Same body compiled with the POPCNT instruction (the baseline x86-64 ISA
 * lacks it and __builtin_popcountll would become a libgcc call). */
MPL_TARGET_POPCNT static void pc_tile_c_popcnt(const uint64_t *const *xr, const uint64_t *const *yr,
                                               size_t kw, uint64_t *cnt)
{
    pc_tile_c_body(xr, yr, kw, cnt);
}
#endif

/* Generic blocked driver around an MR x NR tile function. */
static void pc_driver(const uint64_t *X, size_t m, const uint64_t *Y, size_t n, size_t W,
                      int64_t *C, ptrdiff_t ldc, int64_t weight,
                      pc_tile_fn tile, int MR, int NR)
{
    size_t kb_words = W < PC_KB ? W : PC_KB;
    size_t NB = kb_words ? PC_L2_BYTES / (kb_words * 8) : n;
    NB = NB < (size_t)NR ? (size_t)NR : NB - NB % (size_t)NR;
    const uint64_t *xr[8], *yr[8];
    uint64_t cnt[64];
    for (size_t kb = 0; kb < W; kb += PC_KB) {
        size_t kw = W - kb < PC_KB ? W - kb : PC_KB;
        for (size_t jb = 0; jb < n; jb += NB) {
            size_t jend = n - jb < NB ? n : jb + NB;
            for (size_t i = 0; i < m; i += (size_t)MR) {
                int mr = m - i < (size_t)MR ? (int)(m - i) : MR;
                for (int a = 0; a < MR; ++a)
                    xr[a] = X + (i + (size_t)(a < mr ? a : 0)) * W + kb;
                for (size_t j = jb; j < jend; j += (size_t)NR) {
                    int nr = jend - j < (size_t)NR ? (int)(jend - j) : NR;
                    for (int b = 0; b < NR; ++b)
                        yr[b] = Y + (j + (size_t)(b < nr ? b : 0)) * W + kb;
                    tile(xr, yr, kw, cnt);
                    for (int a = 0; a < mr; ++a)
                        for (int b = 0; b < nr; ++b)
                            add_weighted(C, ldc, i + a, j + b, weight, cnt[a * NR + b]);
                }
            }
        }
    }
}

#if MPL_X86
/* The SIMD paths put columns of C, not words along k, in a vector's lanes (AVX-512 VPOPCNTDQ 8,
 * AVX2 4: below), so a count needs no horizontal sum (planes are short along k: 2048 bits are
 * 32 words, and reducing 24 accumulators of 8 words each cost about as much as the 4 steps that
 * filled them). Each column block of Y is first copied into groups of 8 columns interleaved word by word
 * (pc_y_groups: word w of the group's 8 columns is one vector); a register tile of 6 X rows x
 * 4 groups (32 columns) then takes, per word, 6 broadcasts of X words and 4 vectors of the
 * groups: vpandq + vpopcntq + vpaddq into 24 zmm accumulators of 64-bit counts (cannot
 * overflow), which are C's 6 x 32 counts themselves. */
#define PC_Z_MR 6
#define PC_Z_NG 4                 /* groups of 8 columns per tile */
#define PC_Z_NR (8 * PC_Z_NG)     /* columns per tile */

/* Columns j0..j0+nc-1 of Y, words kb..kb+kw-1, as ceil(nc/8) groups of kw x 8 words (group g,
 * word w, lane l = column j0+8g+l's word kb+w; zero beyond nc). */
static void pc_y_groups(const uint64_t *Y, size_t W, size_t j0, size_t nc, size_t kb, size_t kw, uint64_t *out)
{
    for (size_t g = 0; g < (nc + 7) / 8; g++) {
        const uint64_t *y[8];
        size_t lanes = nc - 8 * g < 8 ? nc - 8 * g : 8;
        for (size_t l = 0; l < 8; l++)
            y[l] = l < lanes ? Y + (j0 + 8 * g + l) * W + kb : NULL;
        uint64_t *o = out + g * kw * 8;
        for (size_t w = 0; w < kw; w++)
            for (size_t l = 0; l < 8; l++)
                o[8 * w + l] = y[l] ? y[l][w] : 0;
    }
}

#define PC_Z_ACC(a, g) c##a##g = _mm512_add_epi64(c##a##g, _mm512_popcnt_epi64(_mm512_and_si512(x, b##g)))
#define PC_Z_ROW(a) x = _mm512_set1_epi64((long long)x##a[w]); \
    PC_Z_ACC(a, 0); PC_Z_ACC(a, 1); PC_Z_ACC(a, 2); PC_Z_ACC(a, 3)

/* C[a, 8g:8g+8] += weight * counts (a < mr; columns at or past nc masked off). */
#define PC_Z_STORE(a, g)                                                                          \
    do {                                                                                          \
        int left_ = nc - 8 * (g);                                                                 \
        if ((a) < mr && left_ > 0) {                                                              \
            __mmask8 m_ = left_ >= 8 ? 0xff : (__mmask8)((1u << left_) - 1);                     \
            int64_t *p_ = C + (ptrdiff_t)(a) * ldc + 8 * (g);                                     \
            __m512i old_ = _mm512_maskz_loadu_epi64(m_, p_);                                      \
            /* vpmullq: the low 64 bits of weight*count, i.e. mod 2^64 like the other paths */    \
            _mm512_mask_storeu_epi64(p_, m_, _mm512_add_epi64(old_, _mm512_mullo_epi64(c##a##g, wv))); \
        }                                                                                         \
    } while (0)
#define PC_Z_STORE_ROW(a) PC_Z_STORE(a, 0); PC_Z_STORE(a, 1); PC_Z_STORE(a, 2); PC_Z_STORE(a, 3)

/* C[0:mr, 0:nc] += weight * (X rows xr) & (4 groups at yg, gs words apart), kw words. Missing
 * rows (a >= mr) repeat a valid one; their counts are dropped. */
MPL_TARGET_AVX512POP __attribute__((noinline)) static void
pc_z_tile(const uint64_t *const *xr, const uint64_t *yg, size_t gs, size_t kw, int64_t *C, ptrdiff_t ldc,
          int mr, int nc, int64_t weight)
{
    const uint64_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3], *x4 = xr[4], *x5 = xr[5];
    const uint64_t *g0 = yg, *g1 = yg + gs, *g2 = yg + 2 * gs, *g3 = yg + 3 * gs;
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00,
            c12 = c00, c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00,
            c32 = c00, c33 = c00, c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00,
            c52 = c00, c53 = c00;
    for (size_t w = 0; w < kw; ++w) {
        const __m512i b0 = _mm512_load_si512((const void *)(g0 + 8 * w));
        const __m512i b1 = _mm512_load_si512((const void *)(g1 + 8 * w));
        const __m512i b2 = _mm512_load_si512((const void *)(g2 + 8 * w));
        const __m512i b3 = _mm512_load_si512((const void *)(g3 + 8 * w));
        __m512i x;
        PC_Z_ROW(0); PC_Z_ROW(1); PC_Z_ROW(2); PC_Z_ROW(3); PC_Z_ROW(4); PC_Z_ROW(5);
    }
    const __m512i wv = _mm512_set1_epi64(weight);
    PC_Z_STORE_ROW(0); PC_Z_STORE_ROW(1); PC_Z_STORE_ROW(2);
    PC_Z_STORE_ROW(3); PC_Z_STORE_ROW(4); PC_Z_STORE_ROW(5);
}

/* AVX2: the same column groups, a tile of 3 X rows x 8 columns (one group: two vectors of 4
 * columns) taking per word 3 broadcast X words and the group's 2 vectors (4 rows make gcc spill).
 * popcount of a byte = LUT[low nibble] + LUT[high nibble] (vpshufb as a 16-entry table) into byte
 * counters, which grow by <= 8 a word: every 31 words (<= 248) vpsadbw folds them into the 64-bit
 * counts of the lanes' columns, so no count needs a horizontal sum (the earlier 3 x 3 tile with k
 * in the lanes: 177 against 228-240 G bit-MAC/s at n = 2048). */
#define PC_Y_MR 3
#define PC_Y_NR 8
#define PC_Y_STEP(acc, b)                                                                   \
    do {                                                                                    \
        const __m256i t_ = _mm256_and_si256(x, b);                                          \
        acc = _mm256_add_epi8(acc, _mm256_shuffle_epi8(lut, _mm256_and_si256(t_, low4)));  \
        acc = _mm256_add_epi8(acc, _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(t_, 4), low4))); \
    } while (0)
#define PC_Y_ROW(a) x = _mm256_set1_epi64x((long long)x##a[w]); PC_Y_STEP(s##a##0, b0); PC_Y_STEP(s##a##1, b1)
#define PC_Y_FOLD(a, v)                                                                     \
    _mm256_store_si256((__m256i *)(tot[a] + 4 * (v)),                                       \
                       _mm256_add_epi64(_mm256_load_si256((const __m256i *)(tot[a] + 4 * (v))), \
                                        _mm256_sad_epu8(s##a##v, zero)))

/* C[0:mr, 0:nc] += weight * (X rows xr) & (the group at yg), kw words (gs: unused, one group). */
MPL_TARGET_AVX2 __attribute__((noinline)) static void
pc_y_tile(const uint64_t *const *xr, const uint64_t *yg, size_t gs, size_t kw, int64_t *C, ptrdiff_t ldc,
          int mr, int nc, int64_t weight)
{
    (void)gs;
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const uint64_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2];
    uint64_t tot[PC_Y_MR][PC_Y_NR] __attribute__((aligned(32))) = {{0}};
    for (size_t w = 0; w < kw;) {
        const size_t wend = kw - w < 31 ? kw : w + 31;
        __m256i s00 = zero, s01 = zero, s10 = zero, s11 = zero, s20 = zero, s21 = zero, x;
        for (; w < wend; ++w) {
            const __m256i b0 = _mm256_load_si256((const __m256i *)(yg + 8 * w));
            const __m256i b1 = _mm256_load_si256((const __m256i *)(yg + 8 * w + 4));
            PC_Y_ROW(0); PC_Y_ROW(1); PC_Y_ROW(2);
        }
        PC_Y_FOLD(0, 0); PC_Y_FOLD(0, 1); PC_Y_FOLD(1, 0); PC_Y_FOLD(1, 1);
        PC_Y_FOLD(2, 0); PC_Y_FOLD(2, 1);
    }
    for (int a = 0; a < mr; ++a)
        for (int l = 0; l < nc && l < PC_Y_NR; ++l)
            add_weighted(C, ldc, (size_t)a, (size_t)l, weight, tot[a][l]);
}

typedef void (*pc_lane_tile_fn)(const uint64_t *const *, const uint64_t *, size_t, size_t, int64_t *, ptrdiff_t,
                                int, int, int64_t);

/* The blocked loop nest of pc_driver around a lane tile (pc_z_tile, pc_y_tile: MR rows x NR
 * columns, NR a multiple of 8): k blocks of PC_KB words, column blocks whose groups
 * (pc_y_groups) fill about half of L2, row tiles, column tiles. With ``est`` (W
 * one k block) it writes the product's published estimate instead: a row group's counts over a
 * column block go to a zeroed scratch (the tile adds to it) and the estimate pass turns them
 * into C's row segments, in ascending columns (estimates.h). Returns 0, or -1 if out of memory. */
static int pc_driver_lanes(const uint64_t *X, size_t m, const uint64_t *Y, size_t n, size_t W,
                           int64_t *C, ptrdiff_t ldc, int64_t weight, mpl_estimate_ctx *est,
                           pc_lane_tile_fn tile, size_t MR, size_t NR)
{
    size_t kb_words = W < PC_KB ? W : PC_KB;
    size_t NB = PC_L2_BYTES / (kb_words * 8);
    NB = NB < NR ? NR : NB - NB % NR;
    if (NB > n + NR)  /* no wider than C (rounded up to whole tiles) */
        NB = (n + NR - 1) / NR * NR;
    uint64_t *groups = aligned_alloc(64, NB * kb_words * sizeof(uint64_t));
    int64_t *scratch = est ? (int64_t *)malloc(MR * NB * sizeof(int64_t)) : NULL;
    if (!groups || (est && !scratch)) {
        free(groups);
        free(scratch);
        return -1;
    }
    const uint64_t *xr[PC_Z_MR > PC_Y_MR ? PC_Z_MR : PC_Y_MR];
    for (size_t kb = 0; kb < W; kb += PC_KB) {
        size_t kw = W - kb < PC_KB ? W - kb : PC_KB;
        for (size_t jb = 0; jb < n; jb += NB) {
            size_t jend = n - jb < NB ? n : jb + NB;
            size_t nc = jend - jb, tiles = (nc + NR - 1) / NR;
            size_t filled = (nc + 7) / 8, whole = tiles * (NR / 8);
            pc_y_groups(Y, W, jb, nc, kb, kw, groups);
            /* whole tiles of groups: the last tile's missing groups are zeros */
            memset(groups + filled * kw * 8, 0, (whole - filled) * kw * 8 * sizeof(uint64_t));
            for (size_t i = 0; i < m; i += MR) {
                int mr = m - i < MR ? (int)(m - i) : (int)MR;
                /* the tiles' destination: C's rows, or the scratch's (column jb at its start) */
                int64_t *dst = est ? scratch : C + (ptrdiff_t)i * ldc + (ptrdiff_t)jb;
                ptrdiff_t ld = est ? (ptrdiff_t)NB : ldc;
                if (est)
                    memset(scratch, 0, MR * NB * sizeof(int64_t));
                for (int a = 0; a < (int)MR; ++a) /* missing rows: reread the first, unused */
                    xr[a] = X + (i + (size_t)(a < mr ? a : 0)) * W + kb;
                for (size_t t = 0; t < tiles; ++t) {
                    size_t j = t * NR;
                    int left = (int)(nc - j < NR ? nc - j : NR);
                    tile(xr, groups + j * kw, 8 * kw, kw, dst + j, ld, mr, left, weight);
                }
                if (est)
                    mpl_estimate_rows(est, i, jb, scratch, (ptrdiff_t)NB, C + (ptrdiff_t)i * ldc + (ptrdiff_t)jb,
                                      ldc, (size_t)mr, nc);
            }
        }
    }
    free(groups);
    free(scratch);
    return 0;
}

/* The lane kernel of ``method`` on this CPU (pc_driver_lanes around pc_z_tile or pc_y_tile), or -2
 * when there is none (the scalar tiles then run). */
static int pc_lanes(const uint64_t *X, size_t m, const uint64_t *Y, size_t n, size_t W, int64_t *C,
                    ptrdiff_t ldc, int64_t weight, int method, mpl_estimate_ctx *est)
{
    if (method == MPL_METHOD_AVX512 && mpl_cpu_vpopcntdq())
        return pc_driver_lanes(X, m, Y, n, W, C, ldc, weight, est, pc_z_tile, PC_Z_MR, PC_Z_NR);
    if ((method == MPL_METHOD_AVX2 || method == MPL_METHOD_AVX512) && mpl_cpu_avx2())
        return pc_driver_lanes(X, m, Y, n, W, C, ldc, weight, est, pc_y_tile, PC_Y_MR, PC_Y_NR);
    return -2;
}
#endif

int mpl_popcount_matmul_est(const uint64_t *X, size_t m, const uint64_t *Y, size_t n, size_t W,
                            int64_t *C, ptrdiff_t ldc, int64_t weight, int method, mpl_estimate_ctx *est)
{
#if MPL_X86
    if (W > 0 && W <= PC_KB && m > 0 && n > 0)
        return pc_lanes(X, m, Y, n, W, C, ldc, weight, method, est);
#endif
    (void)X, (void)m, (void)Y, (void)n, (void)W, (void)C, (void)ldc, (void)weight, (void)method, (void)est;
    return -2;
}

void mpl_popcount_matmul_acc(const uint64_t *X, size_t m, const uint64_t *Y, size_t n,
                             size_t W, int64_t *C, ptrdiff_t ldc, int64_t weight, int method)
{
    if (m == 0 || n == 0 || W == 0)
        return;
#if MPL_X86
    if (pc_lanes(X, m, Y, n, W, C, ldc, weight, method, NULL) == 0)
        return;
    /* no lane kernel, or no memory for its column groups: the scalar tiles need none */
    if (mpl_cpu_popcnt()) {
        pc_driver(X, m, Y, n, W, C, ldc, weight, pc_tile_c_popcnt, PC_C_MR, PC_C_NR);
        return;
    }
#endif
    (void)method;
    pc_driver(X, m, Y, n, W, C, ldc, weight, pc_tile_c_generic, PC_C_MR, PC_C_NR);
}
