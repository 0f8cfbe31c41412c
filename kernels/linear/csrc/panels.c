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

#include "panels.h"

#define CHUNK 256

/* y [M, N] = x [M, K] W^T + bias (bias [N] or NULL), W in panels; N and K multiples of 16. */
void levante_panel_linear(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias,
                          float *y, int threads) {
    const int64_t panels = N / 16, groups = (panels + PANELS - 1) / PANELS;
#pragma omp parallel num_threads(threads)
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        const int64_t rows = M - m0 < CHUNK ? M - m0 : CHUNK;
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < groups; g++)
            group_rows(x + m0 * K, rows, K, w, panels, g * PANELS, bias, y + m0 * N, N);
    }
}

/* act [M, I] = silu(x W_gate^T + b_gate) * (x W_up^T + b_up), W = [W_gate; W_up] [2I, K] in panels (bias [2I]
 * or NULL); I and K multiples of 16. */
void levante_panel_gated(const float *x, int64_t M, int64_t K, const float *w, int64_t I, const float *bias,
                         float *act, int threads) {
#pragma omp parallel num_threads(threads)
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        const int64_t rows = M - m0 < CHUNK ? M - m0 : CHUNK;
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < I / 16; p++) pair_rows(x + m0 * K, rows, K, w, I, p, bias, act + m0 * I);
    }
}
