/* float32 linears on AVX-512 over a weight laid out in 16-output panels: W [N/16][K][16], 16 consecutive
 * outputs' weights interleaved along the input, so that one 16-float load is 16 outputs' weight for one input.
 *
 * A block is three panels (48 outputs) by up to ROWS rows: per input, three weight loads and each row's
 * broadcast input into three accumulators a row. A decode step's few rows read each weight once, at memory
 * speed; a prefill's rows go CHUNK at a time, each block of panels used by every row block of the chunk while
 * it sits in cache. Threads take contiguous ranges of panel groups, each a stream of sequential reads.
 * kernels/linear/panels.py holds the layout; the reference is F.linear.
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
