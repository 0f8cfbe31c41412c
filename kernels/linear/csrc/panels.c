/* float32 linears on AVX-512 over a weight laid out in 16-output panels: W [N/16][K][16], 16 consecutive
 * outputs' weights interleaved along the input, so that one 16-float load is 16 outputs' weight for one input.
 *
 * A block is three panels (48 outputs) by up to ROWS rows: per input, three weight loads and each row's
 * broadcast input into three accumulators a row. A decode step's few rows read each weight once, at memory
 * speed; a prefill's rows go CHUNK at a time, each block of panels used by every row block of the chunk while
 * it sits in cache. Threads take contiguous ranges of panel groups, each a stream of sequential reads.
 * A SwiGLU's gate and up weights as one [2I, K] weight run gated: a gate panel beside its up panel, I rows on,
 * each row's silu(gate) * up written as the block ends. kernels/linear/panels.py holds the layout; the
 * reference is F.linear (gated: silu of its first half times its second).
 */
#include <omp.h>

#include "simd.h"

#define ROWS 8
#define PANELS 3
#define CHUNK 256

/* y[r][0..16 * P) = x_r . panels (+ bias) for R rows and P panels, K floats apart; while at it, the next
 * group's panels (next, or NULL) are fetched into L2. */
INLINE void block(const float *x, int64_t K, const int R, const int P, const float *w, const float *next,
                  const float *bias, float *y, int64_t N) {
    __m512 acc[PANELS][ROWS];
    for (int p = 0; p < P; p++)
        for (int r = 0; r < R; r++) acc[p][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        if (next)
            for (int p = 0; p < PANELS; p++) _mm_prefetch((const char *)(next + p * K * 16 + k * 16), _MM_HINT_T1);
        __m512 wv[PANELS];
        for (int p = 0; p < P; p++) wv[p] = _mm512_loadu_ps(w + p * K * 16 + k * 16);
        for (int r = 0; r < R; r++) {
            __m512 xk = _mm512_set1_ps(x[r * K + k]);
            for (int p = 0; p < P; p++) acc[p][r] = _mm512_fmadd_ps(xk, wv[p], acc[p][r]);
        }
    }
    for (int p = 0; p < P; p++) {
        __m512 b = bias ? _mm512_loadu_ps(bias + 16 * p) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * N + 16 * p, _mm512_add_ps(acc[p][r], b));
    }
}

/* The row and panel counts as constants in each case, so that the accumulators stay in registers. */
#define BLOCK(R)                                                                                                  \
    case R:                                                                                                       \
        if (P == 3) block(x, K, R, 3, w, next, bias, y, N);                                                       \
        else if (P == 2) block(x, K, R, 2, w, next, bias, y, N);                                                  \
        else block(x, K, R, 1, w, next, bias, y, N);                                                              \
        break;

static void rows_block(const float *x, int64_t K, int64_t R, int P, const float *w, const float *next,
                       const float *bias, float *y, int64_t N) {
    switch (R) { BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4) BLOCK(5) BLOCK(6) BLOCK(7) BLOCK(8) }
}

/* y [M, N] = x [M, K] W^T + bias (bias [N] or NULL), W in panels; N and K multiples of 16. With more than one
 * row block, the first reads a group's panels from memory and the rest from cache: the last then fetches the
 * next group's, so that memory and the FMAs overlap (one block alone streams at memory speed without). */
void levante_panel_linear(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias,
                          float *y, int threads) {
    const int64_t panels = N / 16, groups = (panels + PANELS - 1) / PANELS;
#pragma omp parallel num_threads(threads)
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        const int64_t m1 = m0 + CHUNK < M ? m0 + CHUNK : M;
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < groups; g++) {
            const int64_t first = g * PANELS;
            const int P = panels - first < PANELS ? (int)(panels - first) : PANELS;
            const float *next = m1 - m0 > ROWS && first + 2 * PANELS <= panels ? w + (first + PANELS) * K * 16 : 0;
            for (int64_t m = m0; m < m1; m += ROWS)
                rows_block(x + m * K, K, m1 - m < ROWS ? m1 - m : ROWS, P, w + first * K * 16,
                           m + ROWS >= m1 ? next : 0, bias ? bias + 16 * first : 0, y + m * N + 16 * first, N);
        }
    }
}

/* act[r][0..16) = silu(x_r . gate + bias_g) * (x_r . up + bias_u) for R rows: up is `up` floats after gate;
 * the next pair (next, or NULL) fetched into L2 on the way. */
INLINE void gated_block(const float *x, int64_t K, const int R, const float *gate, int64_t up, const float *next,
                        const float *bias, int64_t I, float *act) {
    __m512 g[ROWS], u[ROWS];
    for (int r = 0; r < R; r++) g[r] = u[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        if (next) {
            _mm_prefetch((const char *)(next + k * 16), _MM_HINT_T1);
            _mm_prefetch((const char *)(next + up + k * 16), _MM_HINT_T1);
        }
        __m512 wg = _mm512_loadu_ps(gate + k * 16), wu = _mm512_loadu_ps(gate + up + k * 16);
        for (int r = 0; r < R; r++) {
            __m512 xk = _mm512_set1_ps(x[r * K + k]);
            g[r] = _mm512_fmadd_ps(xk, wg, g[r]);
            u[r] = _mm512_fmadd_ps(xk, wu, u[r]);
        }
    }
    __m512 bg = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    __m512 bu = bias ? _mm512_loadu_ps(bias + I) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++)
        _mm512_storeu_ps(act + r * I, _mm512_mul_ps(silu16(_mm512_add_ps(g[r], bg)), _mm512_add_ps(u[r], bu)));
}

#define GATED(R)                                                                                                  \
    case R: gated_block(x, K, R, gate, up, next, bias, I, act); break;

static void gated_rows(const float *x, int64_t K, int64_t R, const float *gate, int64_t up, const float *next,
                       const float *bias, int64_t I, float *act) {
    switch (R) { GATED(1) GATED(2) GATED(3) GATED(4) GATED(5) GATED(6) GATED(7) GATED(8) }
}

/* act [M, I] = silu(x W_gate^T + b_gate) * (x W_up^T + b_up), W = [W_gate; W_up] [2I, K] in panels (bias [2I]
 * or NULL); I and K multiples of 16. Work and prefetch as levante_panel_linear's, a panel pair a group. */
void levante_panel_gated(const float *x, int64_t M, int64_t K, const float *w, int64_t I, const float *bias,
                         float *act, int threads) {
    const int64_t pairs = I / 16, up = I * K;
#pragma omp parallel num_threads(threads)
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        const int64_t m1 = m0 + CHUNK < M ? m0 + CHUNK : M;
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < pairs; p++) {
            const float *gate = w + p * K * 16, *next = m1 - m0 > ROWS && p + 1 < pairs ? gate + K * 16 : 0;
            for (int64_t m = m0; m < m1; m += ROWS)
                gated_rows(x + m * K, K, m1 - m < ROWS ? m1 - m : ROWS, gate, up, m + ROWS >= m1 ? next : 0,
                           bias ? bias + 16 * p : 0, I, act + m * I + 16 * p);
        }
    }
}
