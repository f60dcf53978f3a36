/* The avx2 variant with its int8 dot on AVX-VNNI (vpdpbusd, Alder Lake and Zen 5 on): one
 * instruction where plain AVX2 takes vpmaddubsw, vpaddw and vpmaddwd. Everything else is
 * fd_kernels_avx2's; compiled with AVX2, FMA, F16C and AVX-VNNI here only.
 */
#define FD_Q8_VNNI 1
#include "quant_q8_avx2.h"

fd_quant_kernels fd_kernels_avx2_vnni;

void fd_kernels_avx2_vnni_init(void) {
    fd_quant_kernels k = fd_kernels_avx2;
    k.name = "avx2_vnni";
    k.fp4_dot_q8 = fp4_dot_q8_rows;
    k.fp4_q8_layout = FD_FP4_PAIRS;
    fd_kernels_avx2_vnni = k;
}
