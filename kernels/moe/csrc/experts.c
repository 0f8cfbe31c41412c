/* A MoE layer's routed experts (SwiGLU) for a step with few rows per expert, float32 on AVX-512.
 *
 * Each local expert's weights lie in 16-output panels, 16 consecutive outputs' weights interleaved along the
 * input: gate_up [2I/16][D][16] (gate panels, then up panels), down [D/16][I][16]. One 16-float load is
 * then 16 outputs' weight for one input, multiplied by each row's broadcast input into one accumulator a
 * row: every weight is read once per block of up to ROWS rows.
 *
 * A work item is one expert the step routes to; items are handed out one at a time. Its thread computes
 * act = silu(x W_gate^T) * (x W_up^T) a gate panel and its up panel at a time, then y = act W_down^T. One
 * thread then adds each assignment's weighted output into out in expert order, the order the torch path's
 * index_add_ adds them in. kernels/moe/panels.py holds the layouts; the reference is the CPU backend's
 * oneDNN path (kernels/moe/cpu.py).
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define ROWS 8

typedef struct {
    const float *gate_up, *down; /* every local expert's panels, one after another */
    int64_t hidden, inter;
} Experts;

/* act[r * I + 0..15] = silu(x_r . gate panel) * (x_r . up panel) for R rows. */
INLINE void gate_up_block(const float *const *x, const int R, const float *gate, const float *up, int64_t D,
                          float *act, int64_t I) {
    __m512 g[ROWS], u[ROWS];
    for (int r = 0; r < R; r++) g[r] = u[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < D; k++) {
        __m512 wg = _mm512_loadu_ps(gate + k * 16), wu = _mm512_loadu_ps(up + k * 16);
        for (int r = 0; r < R; r++) {
            __m512 xk = _mm512_set1_ps(x[r][k]);
            g[r] = _mm512_fmadd_ps(xk, wg, g[r]);
            u[r] = _mm512_fmadd_ps(xk, wu, u[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(act + r * I, _mm512_mul_ps(silu16(g[r]), u[r]));
}

/* y[r * D + 0..15] = act_r . down panel for R rows; two accumulators a row, as one row alone would wait on
 * each FMA before the next. */
INLINE void down_block(const float *act, const int R, const float *panel, int64_t I, float *y, int64_t D) {
    __m512 a[ROWS], b[ROWS];
    for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < I; k += 2) {
        __m512 w0 = _mm512_loadu_ps(panel + k * 16), w1 = _mm512_loadu_ps(panel + k * 16 + 16);
        for (int r = 0; r < R; r++) {
            a[r] = _mm512_fmadd_ps(_mm512_set1_ps(act[r * I + k]), w0, a[r]);
            b[r] = _mm512_fmadd_ps(_mm512_set1_ps(act[r * I + k + 1]), w1, b[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * D, _mm512_add_ps(a[r], b[r]));
}

/* The row count as a constant in each case, so that the accumulators stay in registers. */
#define BY_ROWS(R, CALL)                                                                                          \
    switch (R) {                                                                                                  \
    case 1: CALL(1); break;                                                                                       \
    case 2: CALL(2); break;                                                                                       \
    case 3: CALL(3); break;                                                                                       \
    case 4: CALL(4); break;                                                                                       \
    case 5: CALL(5); break;                                                                                       \
    case 6: CALL(6); break;                                                                                       \
    case 7: CALL(7); break;                                                                                       \
    default: CALL(8); break;                                                                                      \
    }

/* One expert's n rows (inputs at x[0..n)): act [n, I], then y [n, D]. */
static void expert_rows(const Experts *ex, int64_t e, const float *const *x, int64_t n, float *act, float *y) {
    const int64_t D = ex->hidden, I = ex->inter;
    const float *gate_up = ex->gate_up + e * 2 * I * D, *down = ex->down + e * D * I;
    for (int64_t p = 0; p < I / 16; p++) {
        const float *gate = gate_up + p * D * 16, *up = gate_up + (p + I / 16) * D * 16;
        for (int64_t r = 0; r < n; r += ROWS) {
            int64_t R = n - r < ROWS ? n - r : ROWS;
#define GATE_UP(C) gate_up_block(x + r, C, gate, up, D, act + r * I + p * 16, I)
            BY_ROWS(R, GATE_UP)
#undef GATE_UP
        }
    }
    for (int64_t q = 0; q < D / 16; q++) {
        for (int64_t r = 0; r < n; r += ROWS) {
            int64_t R = n - r < ROWS ? n - r : ROWS;
#define DOWN(C) down_block(act + r * I, C, down + q * I * 16, I, y + r * D + q * 16, D)
            BY_ROWS(R, DOWN)
#undef DOWN
        }
    }
}

/* out [T, D] = sum over each token's K assignments to local experts (global ids start .. start + E) of
 * weight * expert(x_t); ids [T, K] int64, weights [T, K] float32. 0, or 1 where scratch could not be had. */
int levante_moe_rows(const float *x, int64_t T, const int64_t *ids, const float *weights, int64_t K,
                     int64_t start, int64_t E, const float *gate_up, const float *down, int64_t D, int64_t I,
                     float *out, int threads) {
    int64_t *begin = calloc(E + 1, sizeof(int64_t)), *token = malloc(T * K * sizeof(int64_t) + 1);
    float *weight = malloc(T * K * sizeof(float) + 1);
    const float **rows = malloc(T * K * sizeof(float *) + 1);
    if (!begin || !token || !weight || !rows) {
        free(begin), free(token), free(weight), free(rows);
        return 1;
    }
    for (int64_t a = 0; a < T * K; a++)
        if (ids[a] >= start && ids[a] < start + E) begin[ids[a] - start + 1]++;
    for (int64_t e = 0; e < E; e++) begin[e + 1] += begin[e];
    int64_t *next = calloc(E, sizeof(int64_t));
    float *act = malloc((begin[E] * (I + D) + 1) * sizeof(float));
    if (!next || !act) {
        free(begin), free(token), free(weight), free(rows), free(next), free(act);
        return 1;
    }
    for (int64_t a = 0; a < T * K; a++) { /* stable: each expert's rows in token order */
        if (ids[a] < start || ids[a] >= start + E) continue;
        int64_t e = ids[a] - start, slot = begin[e] + next[e]++;
        token[slot] = a / K, weight[slot] = weights[a], rows[slot] = x + (a / K) * D;
    }
    float *y = act + begin[E] * I;
    Experts ex = {gate_up, down, D, I};
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t e = 0; e < E; e++)
        if (begin[e + 1] > begin[e])
            expert_rows(&ex, e, rows + begin[e], begin[e + 1] - begin[e], act + begin[e] * I, y + begin[e] * D);
    memset(out, 0, T * D * sizeof(float));
    for (int64_t a = 0; a < begin[E]; a++) {
        float *o = out + token[a] * D;
        const float *ya = y + a * D;
        __m512 w = _mm512_set1_ps(weight[a]);
        for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(o + d, _mm512_add_ps(_mm512_loadu_ps(o + d), _mm512_mul_ps(_mm512_loadu_ps(ya + d), w)));
    }
    free(begin), free(token), free(weight), free(rows), free(next), free(act);
    return 0;
}
