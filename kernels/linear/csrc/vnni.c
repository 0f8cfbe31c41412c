/* Weight-only quantized linears on AVX-512 VNNI, for the few rows of a decode step.
 *
 * The input is rounded to int8 per 32 values (scale absmax / 127, as llama.cpp's Q8 activations), so that
 * vpdpbusd multiplies four unsigned weight codes by four signed input codes per lane. The result equals
 * dequantize(weight) @ (codes * scale) up to float32 summation order; kernels/linear/vnni.py holds that
 * reference and the layouts.
 *
 * Pair order: 64 inputs (two groups of 32) sit in one 512-bit register so that lane l (4 bytes) holds inputs
 * 4*(l/2)..+3 of group l%2. A pair's two scales are then one 64-bit broadcast.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define INLINE static inline __attribute__((always_inline))
#define ROWS 4  /* weight rows per block: they share the input's loads */
#define MAX_M 4 /* input rows per block: one accumulator per (row, input row) */

typedef struct {
    int8_t *codes; /* [M, K] in pair order */
    float *scale;  /* [M, K/32] */
    float *sum;    /* [M, K/32]: scale * sum of the group's codes */
    float *total;  /* [M]: the sums' sum */
} Input;

/* 32 floats -> 32 codes in 8 dwords (low half of a register); its scale and code sum. */
INLINE __m512i round_group(const float *x, float *scale, float *sum) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
    __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    *scale = amax / 127.0f;
    *sum = *scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    return _mm512_castsi256_si512(_mm256_set_m128i(_mm512_cvtsepi32_epi8(qb), _mm512_cvtsepi32_epi8(qa)));
}

static void round_input(const float *x, int64_t M, int64_t K, Input in) {
    const __m512i interleave = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const int64_t G = K / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t p = 0; p < K / 64; p++) {
            const int64_t g = m * G + 2 * p;
            __m512i lo = round_group(x + m * K + 64 * p, in.scale + g, in.sum + g);
            __m512i hi = round_group(x + m * K + 64 * p + 32, in.scale + g + 1, in.sum + g + 1);
            _mm512_storeu_si512(in.codes + m * K + 64 * p, _mm512_permutex2var_epi32(lo, interleave, hi));
        }
    for (int64_t m = 0; m < M; m++) {
        in.total[m] = 0.0f;
        for (int64_t g = 0; g < G; g++) in.total[m] += in.sum[m * G + g];
    }
}

INLINE __m512 pair_of_floats(const float *s) { return _mm512_castpd_ps(_mm512_set1_pd(*(const double *)s)); }

/* Two bfloat16 (a group pair's scales) -> [s0, s1] repeated, as float32: each bf16 to a float's high half. */
INLINE __m512 pair_of_bf16(const uint16_t *s) {
    const __m512i place = _mm512_set4_epi32(0x0302FFFF, 0x0100FFFF, 0x0302FFFF, 0x0100FFFF);
    return _mm512_castsi512_ps(_mm512_shuffle_epi8(_mm512_set1_epi32(*(const int32_t *)s), place));
}

static inline float bf16(uint16_t v) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
}

/* 16 bfloat16 (k of them) -> float32. */
INLINE __m512 load_bf16(__mmask16 k, const uint16_t *v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, v)), 16));
}

/* acc + (zero - 8 * scale) * input sum, over one weight row's groups, 16 lanes at a time. */
INLINE __m512 add_offsets(__m512 acc, const uint16_t *scale, const uint16_t *zero, const float *sum, int64_t G) {
    const __m512 minus8 = _mm512_set1_ps(-8.0f);
    for (int64_t g = 0; g < G; g += 16) {
        __mmask16 k = G - g >= 16 ? 0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        __m512 offset = _mm512_fmadd_ps(minus8, load_bf16(k, scale + g), load_bf16(k, zero + g));
        acc = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(k, sum + g), acc);
    }
    return acc;
}

typedef struct {
    const uint8_t *codes;   /* int4: [N, K/2], int8: [N, K] */
    const uint16_t *scale;  /* bf16; int4: [N, K/32], int8: [N] */
    const uint16_t *zero;   /* bf16, int4: [N, K/32] */
    const float *bias;      /* [N] or NULL */
    int64_t N, K;
} Weight;

/* The codes and scales of pair p of input rows m0..m0+mb. */
INLINE void load_pair(Input in, int64_t K, int64_t m0, int mb, int64_t p, __m512i *xs, __m512 *xscale) {
    for (int i = 0; i < mb; i++) {
        xs[i] = _mm512_loadu_si512(in.codes + (m0 + i) * K + 64 * p);
        xscale[i] = pair_of_floats(in.scale + (m0 + i) * (K / 32) + 2 * p);
    }
}

INLINE void zero(__m512 acc[ROWS][MAX_M], int mb) {
    for (int r = 0; r < ROWS; r++)
        for (int i = 0; i < mb; i++) acc[r][i] = _mm512_setzero_ps();
}

/* int4: byte j of a pair's 32 holds pair-order codes j (low nibble) and j + 32 (high nibble), 0..15;
 * w = (code - 8) * scale + zero. */
INLINE void int4_block(Input in, Weight w, float *y, int64_t m0, int mb, int64_t n0) {
    const int64_t G = w.K / 32;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    __m512 acc[ROWS][MAX_M];
    zero(acc, mb);
    for (int64_t p = 0; p < w.K / 64; p++) {
        __m512i xs[MAX_M];
        __m512 xscale[MAX_M];
        load_pair(in, w.K, m0, mb, p, xs, xscale);
        for (int r = 0; r < ROWS; r++) {
            const int64_t n = n0 + r;
            __m512i packed = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w.codes + n * (w.K / 2) + 32 * p)));
            __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(packed, shift), low);
            __m512 wscale = pair_of_bf16(w.scale + n * G + 2 * p);
            for (int i = 0; i < mb; i++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xs[i]);
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale, xscale[i]), acc[r][i]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        const int64_t n = n0 + r;
        for (int i = 0; i < mb; i++) {
            __m512 all = add_offsets(acc[r][i], w.scale + n * G, w.zero + n * G, in.sum + (m0 + i) * G, G);
            y[(m0 + i) * w.N + n] = _mm512_reduce_add_ps(all) + (w.bias ? w.bias[n] : 0.0f);
        }
    }
}

/* int8: codes + 128 as unsigned bytes, in pair order; w = (code - 128) * scale, one scale a row. */
INLINE void int8_block(Input in, Weight w, float *y, int64_t m0, int mb, int64_t n0) {
    __m512 acc[ROWS][MAX_M];
    zero(acc, mb);
    for (int64_t p = 0; p < w.K / 64; p++) {
        __m512i xs[MAX_M];
        __m512 xscale[MAX_M];
        load_pair(in, w.K, m0, mb, p, xs, xscale);
        for (int r = 0; r < ROWS; r++) {
            __m512i codes = _mm512_loadu_si512(w.codes + (n0 + r) * w.K + 64 * p);
            for (int i = 0; i < mb; i++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xs[i]);
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xscale[i], acc[r][i]);
            }
        }
    }
    for (int i = 0; i < mb; i++) {
        const float shift = 128.0f * in.total[m0 + i]; /* the +128 of every code, times the input */
        for (int r = 0; r < ROWS; r++) {
            const int64_t n = n0 + r;
            float dot = _mm512_reduce_add_ps(acc[r][i]) - shift;
            y[(m0 + i) * w.N + n] = dot * bf16(w.scale[n]) + (w.bias ? w.bias[n] : 0.0f);
        }
    }
}

typedef void (*Block)(Input, Weight, float *, int64_t, int, int64_t);

#define AHEAD 8 /* row blocks a thread prefetches ahead of the one it computes */

INLINE void prefetch(const void *start, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)start + b, _MM_HINT_T0);
}

/* The weight rows of the block at row n: DRAM streams them faster when asked for early. */
INLINE void prefetch_block(Weight w, int64_t n) {
    const int64_t G = w.K / 32;
    if (n >= w.N) return;
    if (w.zero) {
        prefetch(w.codes + n * (w.K / 2), ROWS * (w.K / 2));
        prefetch(w.scale + n * G, ROWS * G * 2);
        prefetch(w.zero + n * G, ROWS * G * 2);
    } else {
        prefetch(w.codes + n * w.K, ROWS * w.K);
        prefetch(w.scale + n, ROWS * 2);
    }
}

#define SPECIALIZE(name, block)                                                                   \
    static void name(Input in, Weight w, float *y, int64_t m0, int mb, int64_t n0) {              \
        switch (mb) {                                                                             \
        case 4: block(in, w, y, m0, 4, n0); break;                                                \
        case 3: block(in, w, y, m0, 3, n0); break;                                                \
        case 2: block(in, w, y, m0, 2, n0); break;                                                \
        default: block(in, w, y, m0, 1, n0); break;                                               \
        }                                                                                         \
    }
SPECIALIZE(int4_rows, int4_block)
SPECIALIZE(int8_rows, int8_block)

/* y [M, N] = x [M, K] @ w.T (+ bias). N % ROWS == 0 and K % 64 == 0. 0, or -1 where memory ran out. */
static int run(Block block, const float *x, Weight w, float *y, int64_t M, int threads) {
    Input in = {aligned_alloc(64, (M * w.K + 63) / 64 * 64), malloc(sizeof(float) * M * (w.K / 32)),
                malloc(sizeof(float) * M * (w.K / 32)), malloc(sizeof(float) * M)};
    int ok = in.codes && in.scale && in.sum && in.total;
    if (ok) {
        round_input(x, M, w.K, in);
        #pragma omp parallel num_threads(threads)
        {
            const int64_t blocks = w.N / ROWS, t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t first = blocks * t / nt * ROWS, end = blocks * (t + 1) / nt * ROWS;
            for (int64_t n0 = first; n0 < first + AHEAD * ROWS && n0 < end; n0 += ROWS) prefetch_block(w, n0);
            for (int64_t n0 = first; n0 < end; n0 += ROWS) {
                if (n0 + AHEAD * ROWS < end) prefetch_block(w, n0 + AHEAD * ROWS);
                for (int64_t m0 = 0; m0 < M; m0 += MAX_M) block(in, w, y, m0, M - m0 < MAX_M ? (int)(M - m0) : MAX_M, n0);
            }
        }
    }
    free(in.codes);
    free(in.scale);
    free(in.sum);
    free(in.total);
    return ok ? 0 : -1;
}

int levante_int4_linear(const float *x, const uint8_t *codes, const uint16_t *scale, const uint16_t *zero,
                        const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    Weight w = {codes, scale, zero, bias, N, K};
    return run(int4_rows, x, w, y, M, threads);
}

int levante_int8_linear(const float *x, const uint8_t *codes, const uint16_t *scale, const float *bias, float *y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    Weight w = {codes, scale, NULL, bias, N, K};
    return run(int8_rows, x, w, y, M, threads);
}
