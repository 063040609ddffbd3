/* Runtime CPU-feature dispatch for mpilayer's kernels.
 *
 * The extension is compiled for the baseline ISA (not tuned to the build host's CPU); SIMD
 * bodies carry __attribute__((target(...))) and are only called after
 * mpl_cpu_*() says the running CPU supports them.  The answer is cached.
 * Defining MPL_NO_SIMD (e.g. MPILAYER_CFLAGS=-DMPL_NO_SIMD) compiles only the
 * portable paths, as on non-x86 targets (useful to test them on x86).
 */
#ifndef MPILAYER_CPU_DISPATCH_H
#define MPILAYER_CPU_DISPATCH_H

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(MPL_NO_SIMD)
#define MPL_X86 1
#define MPL_TARGET_AVX2 __attribute__((target("avx2,popcnt")))
#define MPL_TARGET_POPCNT __attribute__((target("popcnt")))
#define MPL_TARGET_AVX512POP __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,popcnt")))
#define MPL_TARGET_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2")))
/* AVX-VNNI (VEX vpdpbusd) needs GCC >= 11 or clang >= 12 to compile. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define MPL_HAVE_AVXVNNI 1
#define MPL_TARGET_AVXVNNI __attribute__((target("avx2,avxvnni")))
#else
#define MPL_HAVE_AVXVNNI 0
#endif
#include <cpuid.h>
#else
#define MPL_X86 0
#define MPL_HAVE_AVXVNNI 0
#endif

/* Return 1 if the CPU has AVX2 (and the OS saves ymm state), else 0. */
static inline int mpl_cpu_avx2(void)
{
#if MPL_X86
    static int cached = -1; /* atomics: may be first called without the GIL */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx2") ? 1 : 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
#else
    return 0;
#endif
}

/* Return 1 if the CPU has the POPCNT instruction, else 0. */
static inline int mpl_cpu_popcnt(void)
{
#if MPL_X86
    static int cached = -1; /* atomics: may be first called without the GIL */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("popcnt") ? 1 : 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
#else
    return 0;
#endif
}

/* Bits of the feature word cached by mpl_cpu_x86_features(). */
#define MPL_F_AVX512 1u      /* AVX-512 F + BW + VL, and the OS saves zmm/opmask state */
#define MPL_F_VPOPCNTDQ 2u   /* AVX512_VPOPCNTDQ + DQ (with MPL_F_AVX512) */
#define MPL_F_AVX512VNNI 4u  /* AVX512_VNNI (with MPL_F_AVX512) */
#define MPL_F_AVXVNNI 8u     /* AVX-VNNI: VEX-encoded vpdpbusd on ymm (with OS ymm state) */

#if MPL_X86
/* XCR0: which register state the OS saves on context switch.  Without it the
 * CPU may report AVX-512 while zmm registers are not preserved. */
static inline unsigned long long mpl_xgetbv0(void)
{
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

/* One CPUID/XGETBV probe: leaf 1 (OSXSAVE), leaf 7.0 (AVX-512 F/BW/VL,
 * DQ, VNNI, VPOPCNTDQ) and leaf 7.1 (AVX-VNNI). */
static inline unsigned mpl_probe_x86(void)
{
    unsigned a, b, c, d, out = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) /* OSXSAVE */
        return 0;
    unsigned long long xcr0 = mpl_xgetbv0();
    int ymm_os = (xcr0 & 0x6) == 0x6;    /* XMM | YMM state */
    int zmm_os = (xcr0 & 0xe6) == 0xe6;  /* + opmask, ZMM_Hi256, Hi16_ZMM */
    if (__get_cpuid_max(0, 0) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    if (zmm_os && f && bw && vl) {
        out |= MPL_F_AVX512;
        if ((c & (1u << 14)) && (b & (1u << 17))) /* VPOPCNTDQ, and DQ for vpmullq */
            out |= MPL_F_VPOPCNTDQ;
        if ((c & (1u << 11)) && (b & (1u << 17))) /* VNNI, and DQ for the flush's 64-bit products */
            out |= MPL_F_AVX512VNNI;
    }
    unsigned max_sub = a;
    if (max_sub >= 1 && ymm_os && mpl_cpu_avx2()) {
        __cpuid_count(7, 1, a, b, c, d);
        if (a & (1u << 4))
            out |= MPL_F_AVXVNNI;
    }
    return out;
}
#endif

/* The MPL_F_* bits the running CPU and OS support (0 without x86 SIMD). */
static inline unsigned mpl_cpu_x86_features(void)
{
#if MPL_X86
    static int cached = -1; /* atomics: may be first called without the GIL */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        v = (int)mpl_probe_x86();
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return (unsigned)v;
#else
    return 0;
#endif
}

static inline int mpl_cpu_avx512(void) { return (mpl_cpu_x86_features() & MPL_F_AVX512) != 0; }
static inline int mpl_cpu_vpopcntdq(void) { return (mpl_cpu_x86_features() & MPL_F_VPOPCNTDQ) != 0; }
static inline int mpl_cpu_avx512vnni(void) { return (mpl_cpu_x86_features() & MPL_F_AVX512VNNI) != 0; }
static inline int mpl_cpu_avxvnni(void) { return MPL_HAVE_AVXVNNI && (mpl_cpu_x86_features() & MPL_F_AVXVNNI) != 0; }

#endif
