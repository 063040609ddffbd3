/* Instruction peaks: register-only loops of each kernel's inner operation.
 *
 * `mpilayer bench kernels` times these to state every kernel's rate as a
 * fraction of what the core can issue.  Each loop runs 8-12 independent
 * accumulator chains (enough to hide the latencies) and touches no memory.
 */
#include <stdint.h>

#include "cpu_dispatch.h"
#include "peaks.h"

#if MPL_X86
#include <immintrin.h>

/* The loops are written in assembly: compiled from intrinsics, gcc added
 * register moves and spills that the kernels do not have. */
#define R12(M) M("0") M("1") M("2") M("3") M("4") M("5") M("6") M("7") M("8") M("9") M("10") M("11")
#define R8(M) M("0") M("1") M("2") M("3") M("4") M("5") M("6") M("7")
#define ZERO_Z(i) "vpxord %%zmm" i ", %%zmm" i ", %%zmm" i "\n\t"
#define ZERO_Y(i) "vpxor %%ymm" i ", %%ymm" i ", %%ymm" i "\n\t"
#define LOOP(init, body) \
    __asm__ volatile(init "1:\n\t" body "dec %0\n\tjnz 1b\n\tvzeroupper\n\t" : "+r"(iters) :: "cc", CLOBBERS)
#define CLOBBERS_Y "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
    "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define CLOBBERS_Z CLOBBERS_Y, "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", \
    "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

/* vpdpbusd zmm: 64 u8*s8 MACs per instruction; 12 chains (latency 5). */
#define VNNI_Z(i) "vpdpbusd %%zmm31, %%zmm30, %%zmm" i "\n\t"
#define CLOBBERS CLOBBERS_Z
MPL_TARGET_AVX512VNNI static void peak_vnni512(uint64_t iters)
{
    LOOP(R12(ZERO_Z) ZERO_Z("30") ZERO_Z("31"), R12(VNNI_Z));
}

/* vpandq + vpopcntq + vpaddq zmm: 512 bit-MACs per triple; the chain's own
 * count is the AND's other operand, so that it cannot be hoisted. */
#define POP_Z(i) "vpandq %%zmm31, %%zmm" i ", %%zmm2" i "\n\t" "vpopcntq %%zmm2" i ", %%zmm2" i "\n\t" \
    "vpaddq %%zmm2" i ", %%zmm" i ", %%zmm" i "\n\t"
#define R9(M) M("0") M("1") M("2") M("3") M("4") M("5") M("6") M("7") M("8")
MPL_TARGET_AVX512POP static void peak_popcnt512(uint64_t iters)
{
    LOOP(R9(ZERO_Z) ZERO_Z("31"), R9(POP_Z)); /* temps zmm20..zmm28 */
}

/* vfmadd231pd zmm: 8 f64 MACs. */
#define FMA_Z(i) "vfmadd231pd %%zmm31, %%zmm30, %%zmm" i "\n\t"
__attribute__((target("avx512f"))) static void peak_fma512(uint64_t iters)
{
    LOOP(R12(ZERO_Z) ZERO_Z("30") ZERO_Z("31"), R12(FMA_Z));
}
#undef CLOBBERS
#define CLOBBERS CLOBBERS_Y

/* AVX2 int8 step of the 7-bit kernel: vpmaddubsw + vpmaddwd + vpaddd, 32 MACs
 * (temps ymm12/13 alternate; renaming removes the false dependencies). */
#define MADD_Y(i, t) "vpmaddubsw %%ymm15, %%ymm" i ", %%ymm" t "\n\t" \
    "vpmaddwd %%ymm14, %%ymm" t ", %%ymm" t "\n\t" "vpaddd %%ymm" t ", %%ymm" i ", %%ymm" i "\n\t"
#define MADD_Y2(i) MADD_Y(i, "12")
MPL_TARGET_AVX2 static void peak_maddubs256(uint64_t iters)
{
    LOOP(R12(ZERO_Y) ZERO_Y("14") ZERO_Y("15"), R12(MADD_Y2));
}

/* AVX2 popcount step of the binary-plane kernel: vpand + nibble LUT (shift,
 * 2 masks, 2 vpshufb) + 2 byte adds = 8 ops per 256 bit-MACs (the kernel's
 * vpsadbw every 31 steps is left out); 8 chains, temps ymm8/9. */
#define POP_Y(i) "vpand %%ymm14, %%ymm" i ", %%ymm8\n\t" "vpsrlw $4, %%ymm8, %%ymm9\n\t" \
    "vpand %%ymm13, %%ymm8, %%ymm8\n\t" "vpand %%ymm13, %%ymm9, %%ymm9\n\t"                 \
    "vpshufb %%ymm8, %%ymm12, %%ymm8\n\t" "vpshufb %%ymm9, %%ymm12, %%ymm9\n\t"             \
    "vpaddb %%ymm9, %%ymm8, %%ymm8\n\t" "vpaddb %%ymm8, %%ymm" i ", %%ymm" i "\n\t"
MPL_TARGET_AVX2 static void peak_popcnt256(uint64_t iters)
{
    LOOP(R8(ZERO_Y) ZERO_Y("12") ZERO_Y("13") ZERO_Y("14"), R8(POP_Y));
}

/* vfmadd231pd ymm: 4 f64 MACs. */
#define FMA_Y(i) "vfmadd231pd %%ymm15, %%ymm14, %%ymm" i "\n\t"
__attribute__((target("avx2,fma"))) static void peak_fma256(uint64_t iters)
{
    LOOP(R12(ZERO_Y) ZERO_Y("14") ZERO_Y("15"), R12(FMA_Y));
}

#if MPL_HAVE_AVXVNNI
/* VEX vpdpbusd ymm (AVX-VNNI): 32 MACs. */
#define VNNI_Y(i) "%{vex%} vpdpbusd %%ymm15, %%ymm14, %%ymm" i "\n\t"
MPL_TARGET_AVXVNNI static void peak_avxvnni256(uint64_t iters)
{
    LOOP(R12(ZERO_Y) ZERO_Y("14") ZERO_Y("15"), R12(VNNI_Y));
}
#endif
#undef CLOBBERS
#endif

/* Run `iters` iterations of loop `which`; return the MACs (or bit-MACs) done,
 * or 0 if this CPU/build lacks the instructions. */
uint64_t mpl_peak_run(int which, uint64_t iters)
{
    uint64_t per_iter = 0;
#if MPL_X86
    switch (which) {
    case MPL_PEAK_VNNI512:
        if (!mpl_cpu_avx512vnni()) return 0;
        peak_vnni512(iters); per_iter = 12 * 64; break;
    case MPL_PEAK_POPCNT512:
        if (!mpl_cpu_vpopcntdq()) return 0;
        peak_popcnt512(iters); per_iter = 9 * 512; break;
    case MPL_PEAK_FMA512:
        if (!mpl_cpu_avx512()) return 0; /* F is enough for vfmadd231pd zmm */
        peak_fma512(iters); per_iter = 12 * 8; break;
    case MPL_PEAK_MADDUBS256:
        if (!mpl_cpu_avx2()) return 0;
        peak_maddubs256(iters); per_iter = 12 * 32; break;
    case MPL_PEAK_POPCNT256:
        if (!mpl_cpu_avx2()) return 0;
        peak_popcnt256(iters); per_iter = 8 * 256; break;
    case MPL_PEAK_FMA256:
        if (!mpl_cpu_avx2() || !__builtin_cpu_supports("fma")) return 0;
        peak_fma256(iters); per_iter = 12 * 4; break;
#if MPL_HAVE_AVXVNNI
    case MPL_PEAK_AVXVNNI256:
        if (!mpl_cpu_avxvnni()) return 0;
        peak_avxvnni256(iters); per_iter = 12 * 32; break;
#endif
    default:
        return 0;
    }
#else
    (void)which;
    (void)iters;
#endif
    return per_iter * iters;
}
