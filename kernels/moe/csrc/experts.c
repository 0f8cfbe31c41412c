/* A MoE layer's routed experts (SwiGLU) for a step with few rows per expert, float32 on AVX-512.
 *
 * Each local expert's weights lie in 16-output panels, 16 consecutive outputs' weights interleaved along the
 * input: gate_up [2I/16][D][16] (gate panels, then up panels), down [D/16][I][16]. One 16-float load is
 * then 16 outputs' weight for one input, multiplied by each row's broadcast input into one accumulator a
 * row: every weight is read once per block of up to ROWS rows.
 *
 * Each expert's rows are first gathered, one after another. A work item is one expert the step routes to;
 * items are handed out one at a time. Its thread runs the dense linears' blocks (csrc/panels.h) on its
 * weights: act = silu(x W_gate^T) * (x W_up^T) a gate panel and its up panel at a time, then y = act W_down^T
 * three panels at a time. One thread then adds each assignment's weighted output into out in expert order, the
 * order the torch path's index_add_ adds them in. kernels/moe/panels.py holds the layouts; the reference is
 * the CPU backend's oneDNN path (kernels/moe/cpu.py).
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "panels.h"

typedef struct {
    const float *gate_up, *down; /* every local expert's panels, one after another */
    int64_t hidden, inter;
} Experts;

/* One expert's n rows (x [n, D]): act [n, I], then y [n, D]. */
static void expert_rows(const Experts *ex, int64_t e, const float *x, int64_t n, float *act, float *y) {
    const int64_t D = ex->hidden, I = ex->inter;
    const float *gate_up = ex->gate_up + e * 2 * I * D, *down = ex->down + e * D * I;
    for (int64_t p = 0; p < I / 16; p++) pair_rows(x, n, D, gate_up, I, p, 0, act);
    for (int64_t first = 0; first < D / 16; first += PANELS) group_rows(act, n, I, down, D / 16, first, 0, y, D);
}

/* out [T, D] = sum over each token's K assignments to local experts (global ids start .. start + E) of
 * weight * expert(x_t); ids [T, K] int64, weights [T, K] float32. 0, or 1 where scratch could not be had. */
int levante_moe_rows(const float *x, int64_t T, const int64_t *ids, const float *weights, int64_t K,
                     int64_t start, int64_t E, const float *gate_up, const float *down, int64_t D, int64_t I,
                     float *out, int threads) {
    int64_t *begin = calloc(E + 1, sizeof(int64_t)), *token = malloc(T * K * sizeof(int64_t) + 1);
    float *weight = malloc(T * K * sizeof(float) + 1);
    if (!begin || !token || !weight) {
        free(begin), free(token), free(weight);
        return 1;
    }
    for (int64_t a = 0; a < T * K; a++)
        if (ids[a] >= start && ids[a] < start + E) begin[ids[a] - start + 1]++;
    for (int64_t e = 0; e < E; e++) begin[e + 1] += begin[e];
    int64_t *next = calloc(E, sizeof(int64_t));
    float *xs = malloc((begin[E] * (D + I + D) + 1) * sizeof(float)); /* gathered rows, act, y */
    if (!next || !xs) {
        free(begin), free(token), free(weight), free(next), free(xs);
        return 1;
    }
    for (int64_t a = 0; a < T * K; a++) { /* stable: each expert's rows in token order */
        if (ids[a] < start || ids[a] >= start + E) continue;
        int64_t e = ids[a] - start, slot = begin[e] + next[e]++;
        token[slot] = a / K, weight[slot] = weights[a];
        memcpy(xs + slot * D, x + (a / K) * D, D * sizeof(float));
    }
    float *act = xs + begin[E] * D, *y = act + begin[E] * I;
    Experts ex = {gate_up, down, D, I};
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t e = 0; e < E; e++)
        if (begin[e + 1] > begin[e])
            expert_rows(&ex, e, xs + begin[e] * D, begin[e + 1] - begin[e], act + begin[e] * I, y + begin[e] * D);
    memset(out, 0, T * D * sizeof(float));
    for (int64_t a = 0; a < begin[E]; a++) {
        float *o = out + token[a] * D;
        const float *ya = y + a * D;
        __m512 w = _mm512_set1_ps(weight[a]);
        for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(o + d, _mm512_add_ps(_mm512_loadu_ps(o + d), _mm512_mul_ps(_mm512_loadu_ps(ya + d), w)));
    }
    free(begin), free(token), free(weight), free(next), free(xs);
    return 0;
}
