/* Blocks over weights in 16-output panels (W [N/16][K][16]), shared by the dense linears (linear/csrc/panels.c)
 * and the routed experts (moe/csrc/experts.c): a block is up to PANELS panels by up to ROWS rows, x's rows K
 * floats apart. */
#ifndef LEVANTE_PANELS_H
#define LEVANTE_PANELS_H

#include "simd.h"

#define ROWS 8
#define PANELS 3

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

/* y [M, N] (outputs 16 * first on) = x [M, K] . the group of panels from `first` (+ bias, or NULL), ROWS rows a
 * block: the first block reads the panels from memory, the rest from cache, and the last fetches the next
 * group's into L2 so that memory and the FMAs overlap (with one block of 2-8 rows too: the hardware's prefetch
 * alone fell short). */
static void group_rows(const float *x, int64_t M, int64_t K, const float *w, int64_t panels, int64_t first,
                       const float *bias, float *y, int64_t N) {
    const int P = panels - first < PANELS ? (int)(panels - first) : PANELS;
    const float *next = first + 2 * PANELS <= panels ? w + (first + PANELS) * K * 16 : 0;
    for (int64_t m = 0; m < M; m += ROWS)
        rows_block(x + m * K, K, M - m < ROWS ? M - m : ROWS, P, w + first * K * 16, m + ROWS >= M ? next : 0,
                   bias ? bias + 16 * first : 0, y + m * N + 16 * first, N);
}

/* act [M, I] (outputs 16 * p on) = silu(x . gate panel p + bias) * (x . up panel p + bias) for x [M, K], W =
 * [W_gate; W_up] [2I, K] in panels (bias [2I] or NULL): group_rows' blocks and prefetch, a panel pair a group. */
static void pair_rows(const float *x, int64_t M, int64_t K, const float *w, int64_t I, int64_t p, const float *bias,
                      float *act) {
    const float *gate = w + p * K * 16, *next = p + 1 < I / 16 ? gate + K * 16 : 0;
    for (int64_t m = 0; m < M; m += ROWS)
        gated_rows(x + m * K, K, M - m < ROWS ? M - m : ROWS, gate, I * K, m + ROWS >= M ? next : 0,
                   bias ? bias + 16 * p : 0, I, act + m * I + 16 * p);
}

#endif
