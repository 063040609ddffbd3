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
#else
#define MPL_X86 0
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

#endif
