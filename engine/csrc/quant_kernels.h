/* Per-ISA primitives for the quantized weight formats of V4-Flash (spec §4.3, §4.4).
 *
 * FP4 (routed experts): bytes [rows, K/2], byte j holds E2M1 codes of elements 2j (low nibble) and
 * 2j+1 (high nibble); one E8M0 scale byte per 32 elements, [rows, K/32]. K is a multiple of 32.
 * FP8 (everything else): E4M3 bytes [rows, K] with one E8M0 scale per 128x128 tile.
 *
 * Each variant (scalar reference, AVX2, AVX-512, NEON) fills one fd_quant_kernels table with the
 * same five primitives; experts.c builds the expert FFN and the linears from them, so threading
 * and bookkeeping are shared and only the inner loops differ per ISA.
 *
 * FP4 activations are passed in the variant's own order within each 32-element block (its
 * fp4_layout, see fd_fp4_perm_index): SIMD variants decode a register of low nibbles (even
 * elements) and one of high nibbles (odd elements), so the activations are permuted once per call
 * to match, instead of shuffling the weights on every row. The scalar reference uses natural order.
 */
#ifndef FD_QUANT_KERNELS_H
#define FD_QUANT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* At most this many activation rows go through one fused dot call. */
#define FD_DOT_MAX_M 4

/* Runs `call` with FD_M the compile-time constant 1..4 matching m (4 for m >= 4), so the inlined
 * kernels' token loops unroll; `call` names FD_M where the token count goes. */
#define FD_SWITCH_M4(m, call)                                                                  \
    switch (m) {                                                                               \
    case 1: { enum { FD_M = 1 }; call; } break;                                                \
    case 2: { enum { FD_M = 2 }; call; } break;                                                \
    case 3: { enum { FD_M = 3 }; call; } break;                                                \
    default: { enum { FD_M = 4 }; call; } break;                                               \
    }

enum {
    FD_FP4_NATURAL = 0, /* element k at k */
    FD_FP4_EVEN_ODD = 1, /* per block: 16 even elements, then 16 odd (AVX-512, NEON) */
    FD_FP4_QUADS = 2,    /* per block, per 8: 4 even, then the 4 odd of the same pairs (AVX2) */
    /* Per 128-element chunk (64 bytes, 4 blocks) the nibble planes of one 64-byte load: element
     * 8w+p at 16p+w (16 dwords, plane p = bits 4p..4p+3; AVX-512 fp32) or element 4w+p at 32p+w
     * (32 words; AVX-512 bf16). Lane l of a plane then belongs to block l/4 (fp32) or, after
     * vdpbf16ps pairs words, dword l to block l/4 (bf16), so one scale vector serves the chunk.
     * Blocks after the last full chunk use FD_FP4_EVEN_ODD (PLANES8) or natural order (PLANES4). */
    FD_FP4_PLANES8 = 3,
    FD_FP4_PLANES4 = 4,
    /* Per 64 elements (two blocks, one 32-byte load of weights): the 16 even elements of each
     * block, then the 16 odd of each, as the low and high nibbles of the load come out (int8
     * AVX2). A last, odd block is in FD_FP4_EVEN_ODD order. */
    FD_FP4_PAIRS = 5,
    /* The same per 128 elements (four blocks, one 64-byte load; int8 AVX-512): the 16 even
     * elements of each of the four blocks, then the 16 odd of each. Blocks after the last whole
     * four are in FD_FP4_PAIRS order. */
    FD_FP4_QUADS4 = 6,
};
#define FD_FP4_CHUNK 128

/* Orders of fp8_dot_bf16's activations (fp8_bf16_layout). */
enum {
    FD_FP8_NATURAL = 0,
    /* Per 64-element block, the row padded with zeros to a whole block: word w < 32 holds element
     * 16(w/8) + w%8 and word 32 + w element 16(w/8) + 8 + w%8, the order in which vpunpcklbw and
     * vpunpckhbw pair the low and high bytes of 64 decoded weights (AVX-512 VBMI). */
    FD_FP8_UNPACK64 = 1,
};
#define FD_FP8_BLOCK 64

typedef struct {
    const char *name;
    int fp4_layout;
    /* y[t*ys + r] = sum_k W[r,k] * x[t][k] for r < rows, t < m <= FD_DOT_MAX_M (overwrites y).
     * W is FP4: row r at w + r*ws bytes, its scales at s + r*ss. x[t] in fp4_layout, K floats. */
    void (*fp4_dot)(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows, int K,
                    const float *const *x, int m, float *y, size_t ys);
    /* One FP4 row -> K floats, scaled, in fp4_layout order. */
    void (*fp4_decode)(const uint8_t *w, const uint8_t *s, int K, float *dst);
    /* Same as fp4_dot for FP8 rows (natural order x). tile_scale[kt] is the float scale of K tile
     * kt (128 wide) shared by all these rows; K may be any positive length. */
    void (*fp8_dot)(const uint8_t *w, size_t ws, const float *tile_scale, int rows, int K,
                    const float *const *x, int m, float *y, size_t ys);
    /* One FP8 row -> K floats, scaled. */
    void (*fp8_decode)(const uint8_t *w, const float *tile_scale, int K, float *dst);
    /* y[t*ys + j] = dot(x[t], w + j*ldw) over K floats, t < m, j < n (overwrites y). */
    void (*gemm_f32)(const float *const *x, int m, const float *w, size_t ldw, int n, int K,
                     float *y, size_t ys);
    /* Optional (NULL: use fp4_dot on the same values as fp32): fp4_dot with bf16 activations in
     * fp4_bf16_layout order. Products of bf16 and E2M1 values are exact in fp32, so this differs from
     * fp4_dot on the widened values only in summation order (AVX512_BF16 vdpbf16ps). */
    void (*fp4_dot_bf16)(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                         int K, const uint16_t *const *x, int m, float *y, size_t ys);
    int fp4_bf16_layout; /* order of fp4_dot_bf16's activations (0 when it has none: natural) */
    /* Same as fp8_dot for bf16 weights (raw bit patterns, row r at w + r*ws elements) and fp32
     * activations in natural order: each weight widened exactly, fp32 products and sums. */
    void (*bf16_dot)(const uint16_t *w, size_t ws, int rows, int K, const float *const *x, int m,
                     float *y, size_t ys);
    /* Optional (NULL: fp8_dot): fp8_dot for rows known to hold no NaN code (0x7F/0xFF), which
     * skips the per-element NaN patch. */
    void (*fp8_dot_finite)(const uint8_t *w, size_t ws, const float *tile_scale, int rows, int K,
                           const float *const *x, int m, float *y, size_t ys);
    /* Optional (NULL: widen to fp32 and gemm_f32): gemm_f32 on bf16 activations and bf16 weight
     * rows (raw bit patterns, natural order, any K), fp32 sums (AVX512_BF16 vdpbf16ps). */
    void (*gemm_bf16)(const uint16_t *const *x, int m, const uint16_t *w, size_t ldw, int n, int K,
                      float *y, size_t ys);
    /* Optional (NULL: widen to fp32 and fp8_dot): fp8_dot with bf16 activations (natural order),
     * each weight decoded exactly to bf16; NaN codes give NaN (AVX512_BF16 vdpbf16ps). */
    void (*fp8_dot_bf16)(const uint8_t *w, size_t ws, const float *tile_scale, int rows, int K,
                         const uint16_t *const *x, int m, float *y, size_t ys);
    /* Lightning-indexer scores (spec §2.6.2) of FD_INDEX_TILE key rows held transposed in fp32,
     * kt[d * FD_INDEX_TILE + j] = element d of row j (d < D, kt 64-byte aligned): for each row j,
     * out[j] = sum over h < H, in order, of w[h] * max(0, dot_h), dot_h = the sum over d, in
     * order, of q[h * D + d] * kt[d * FD_INDEX_TILE + j] (fp32). Writes FD_INDEX_TILE outputs. */
    void (*index_tile)(const float *q, const float *w, int H, int D, const float *kt, float *out);
    /* Order of fp8_dot_bf16's activations (FD_FP8_*); rows in FD_FP8_UNPACK64 are padded to a
     * multiple of FD_FP8_BLOCK words (fd_fp8_row_words). */
    int fp8_bf16_layout;
    /* Optional (NULL: none): fp4_dot on activations quantized to int8 per 32-element block
     * (fd_q8_quantize): xq[t] K int8 in fp4_q8_layout order, xd[t] the K/32 block steps then
     * the K/32 blocks' sums of q. Each
     * block's sum of integer products (2 x E2M1 times int8) is exact; the block step, the weight
     * scale and the final 1/2 are fp32 multiplies, the blocks summed in fp32. */
    void (*fp4_dot_q8)(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows, int K,
                       const int8_t *const *xq, const float *const *xd, int m, float *y,
                       size_t ys);
    int fp4_q8_layout;
} fd_quant_kernels;

#define FD_INDEX_TILE 32

/* A bf16 bit pattern as the float it denotes (exact). */
static inline float fd_bf16_f32(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* A float rounded to the nearest bf16 (ties to even); NaN stays a quiet NaN. */
static inline uint16_t fd_f32_bf16(float f) {
    union {
        uint32_t u;
        float f;
    } v;
    v.f = f;
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((v.u >> 16) | 0x40);
    v.u += 0x7FFFu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* Exact decode tables (spec §4.3/§4.4): E2M1 code -> value, E8M0 byte -> 2^(b-127) (255: NaN),
 * E4M3 byte -> value (0x7F/0xFF: NaN). Filled by fd_quant_tables_init(). */
extern float fd_e2m1_f32[16];
extern float fd_e8m0_f32[256];
extern float fd_e4m3_f32[256];
/* 2 x the E2M1 value of each code: integers in [-12, 12] (the int8 dots' weights). */
extern const int8_t fd_e2m1_x2[16];
void fd_quant_tables_init(void);

/* Position of natural element k of a K-element row in an fp4 layout. */
static inline int fd_fp4_perm_index(int layout, int k, int K) {
    if (layout == FD_FP4_PLANES8 || layout == FD_FP4_PLANES4) {
        if (k < K - K % FD_FP4_CHUNK) {
            const int base = k & ~(FD_FP4_CHUNK - 1), r = k & (FD_FP4_CHUNK - 1);
            return layout == FD_FP4_PLANES8 ? base + 16 * (r & 7) + (r >> 3)
                                            : base + 32 * (r & 3) + (r >> 2);
        }
        if (layout == FD_FP4_PLANES4) return k;
        layout = FD_FP4_EVEN_ODD;
    }
    if (layout == FD_FP4_QUADS4) {
        if (k < K - K % 128) {
            const int r = k & 127;
            return (k & ~127) + 64 * (r & 1) + 16 * (r >> 5) + ((r & 31) >> 1);
        }
        layout = FD_FP4_PAIRS;
    }
    if (layout == FD_FP4_PAIRS) {
        if (k < K - K % 64) {
            const int r = k & 63;
            return (k & ~63) + 32 * (r & 1) + 16 * (r >> 5) + ((r & 31) >> 1);
        }
        layout = FD_FP4_EVEN_ODD;
    }
    int j = (k & 31) >> 1, odd = k & 1, base = k & ~31;
    if (layout == FD_FP4_EVEN_ODD) return base + 16 * odd + j;
    if (layout == FD_FP4_QUADS) return base + 8 * (j >> 2) + 4 * odd + (j & 3);
    return k;
}
/* Position of natural element k in an fp8 layout, and the words a K-element row takes there. */
static inline int fd_fp8_perm_index(int layout, int k) {
    if (layout != FD_FP8_UNPACK64) return k;
    const int r = k & (FD_FP8_BLOCK - 1);
    return (k & ~(FD_FP8_BLOCK - 1)) + 32 * ((r >> 3) & 1) + 8 * (r >> 4) + (r & 7);
}
static inline size_t fd_fp8_row_words(int layout, int K) {
    return layout == FD_FP8_UNPACK64 ? (size_t)(K + FD_FP8_BLOCK - 1) / FD_FP8_BLOCK * FD_FP8_BLOCK
                                     : (size_t)K;
}
/* K natural-order bf16 words -> fd_fp8_row_words(layout, K) words in that layout (padding 0). */
void fd_fp8_permute_row_bf16(int layout, const uint16_t *src, uint16_t *dst, int K);
/* src (K natural-order floats, K a multiple of 32) -> dst in the given layout. */
void fd_fp4_permute_row(int layout, const float *src, float *dst, int K);
/* The same for bf16 rows. */
void fd_fp4_permute_row_bf16(int layout, const uint16_t *src, uint16_t *dst, int K);
/* n floats (n a multiple of 32) -> int8 per 32-element block b: d[b] = amax / 127, q = x / d
 * rounded to nearest even (|q| <= 127), element k stored at q[pos[k]] (pos NULL: at q[k]), and
 * sum[b] = the block's sum of q (an exact integer). An all-zero block gets d = 0; a block holding
 * Inf or NaN gets d = NaN (its dots are NaN). fp4_dot_q8 takes d and sum as one row of block
 * figures: the K/32 steps, then the K/32 sums. */
void fd_q8_quantize(const float *x, int n, const int *pos, int8_t *q, float *d, float *sum);

extern const fd_quant_kernels fd_kernels_scalar;
#if defined(FD_HAVE_X86_VARIANTS)
extern const fd_quant_kernels fd_kernels_avx2;
extern const fd_quant_kernels fd_kernels_avx512;
extern const fd_quant_kernels fd_kernels_avx512_bf16; /* avx512 + vdpbf16ps for bf16 activations */
/* avx2 with the int8 dot on AVX-VNNI (vpdpbusd); filled from fd_kernels_avx2 by
 * fd_quant_tables_init */
extern fd_quant_kernels fd_kernels_avx2_vnni;
void fd_kernels_avx2_vnni_init(void);
#endif
#if defined(FD_HAVE_NEON_VARIANTS)
extern const fd_quant_kernels fd_kernels_neon;
#endif

#endif
