#include "cpu_features.h"

#include <string.h>

#include "fd_platform.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define FD_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
static void fd_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    int v[4];
    __cpuidex(v, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)v[i];
}
static unsigned long long fd_xgetbv0(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void fd_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
static unsigned long long fd_xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif
#endif

#if defined(__aarch64__) || defined(_M_ARM64)
#define FD_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP_SVE
#define HWCAP_SVE (1 << 22)
#endif
#endif
#endif

static fd_cpu_features g_features;
static int g_detected = 0;

static void fd_detect(fd_cpu_features *f) {
    memset(f, 0, sizeof *f);
    f->logical_cores = fd_logical_cores();
#if defined(FD_X86)
    unsigned r[4];
    fd_cpuid(0, 0, r);
    unsigned max_leaf = r[0];
    fd_cpuid(1, 0, r);
    unsigned ecx1 = r[2];
    int osxsave = (ecx1 >> 27) & 1;
    unsigned long long xcr0 = osxsave ? fd_xgetbv0() : 0;
    int os_avx = (xcr0 & 0x6) == 0x6;                 /* XMM + YMM state */
    int os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;  /* opmask + ZMM_Hi256 + Hi16_ZMM */
    int os_amx = (xcr0 & 0x60000) == 0x60000;         /* XTILECFG + XTILEDATA */
    f->sse42 = (ecx1 >> 20) & 1;
    f->avx = os_avx && ((ecx1 >> 28) & 1);
    f->fma = os_avx && ((ecx1 >> 12) & 1);
    f->f16c = os_avx && ((ecx1 >> 29) & 1);
    if (max_leaf >= 7) {
        fd_cpuid(7, 0, r);
        unsigned ebx7 = r[1], ecx7 = r[2], edx7 = r[3], max_sub7 = r[0];
        f->avx2 = os_avx && ((ebx7 >> 5) & 1);
        f->avx512f = os_avx512 && ((ebx7 >> 16) & 1);
        f->avx512dq = os_avx512 && ((ebx7 >> 17) & 1);
        f->avx512bw = os_avx512 && ((ebx7 >> 30) & 1);
        f->avx512vl = os_avx512 && ((ebx7 >> 31) & 1);
        f->avx512_vnni = os_avx512 && ((ecx7 >> 11) & 1);
        f->avx512_vbmi = os_avx512 && ((ecx7 >> 1) & 1);
        f->amx_bf16 = os_amx && ((edx7 >> 22) & 1);
        f->amx_tile = os_amx && ((edx7 >> 24) & 1);
        f->amx_int8 = os_amx && ((edx7 >> 25) & 1);
        if (max_sub7 >= 1) {
            fd_cpuid(7, 1, r);
            f->avx512_bf16 = os_avx512 && ((r[0] >> 5) & 1);
            f->avx_vnni = os_avx && ((r[0] >> 4) & 1); /* VEX-encoded vpdpbusd */
        }
    }
#elif defined(FD_ARM64)
    f->neon = 1; /* Advanced SIMD is mandatory on AArch64. */
#if defined(__linux__)
    unsigned long hw = getauxval(AT_HWCAP);
    f->dotprod = (hw & HWCAP_ASIMDDP) != 0;
    f->sve = (hw & HWCAP_SVE) != 0;
#elif defined(__APPLE__)
    f->dotprod = 1; /* every Apple Silicon core has it */
#endif
#endif
}

const fd_cpu_features *fd_get_cpu_features(void) {
    if (!g_detected) {
        fd_detect(&g_features);
        g_detected = 1;
    }
    return &g_features;
}
