/* Register-only instruction-peak loops (see peaks.c). */
#ifndef MPILAYER_PEAKS_H
#define MPILAYER_PEAKS_H

#include <stdint.h>

#define MPL_PEAK_VNNI512 0     /* vpdpbusd zmm, 64 MACs */
#define MPL_PEAK_POPCNT512 1   /* vpandq + vpopcntq + vpaddq zmm, 512 bit-MACs */
#define MPL_PEAK_FMA512 2      /* vfmadd231pd zmm, 8 MACs */
#define MPL_PEAK_MADDUBS256 3  /* vpmaddubsw + vpmaddwd + vpaddd ymm, 32 MACs */
#define MPL_PEAK_POPCNT256 4   /* vpand + nibble-LUT popcount ymm, 256 bit-MACs */
#define MPL_PEAK_FMA256 5      /* vfmadd231pd ymm, 4 MACs */
#define MPL_PEAK_AVXVNNI256 6  /* VEX vpdpbusd ymm, 32 MACs */

uint64_t mpl_peak_run(int which, uint64_t iters);

#endif
