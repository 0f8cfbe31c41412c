/* Paged attention, one query row at a time (a decode row, or a prompt's row over the keys up to it), float32,
 * on AVX-512.
 *
 * A work item is a row, or a share of its kv heads where there are fewer rows than threads; items are handed
 * out one at a time, as a prompt's rows grow in cost.
 * For each kv head, its G = Hq / Hkv query heads score the keys the sequence sees straight from the cache
 * blocks (no gather; rows prefetched ahead, as the blocks lie scattered), softmax in float32 with the
 * row's maximum subtracted, then sum the value rows. kernels/attention/decode.py holds the layouts; the
 * reference is the CPU backend's SDPA path over the gathered keys.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "simd.h"

typedef struct {
    const float *k, *v;        /* cache rows: slot s, head h at k + s * k_slot + h * k_head */
    int64_t k_slot, k_head, v_slot, v_head;
    const int64_t *tables;     /* [B, W] block ids */
    int64_t width, block_size;
    const int64_t *first, *lens; /* [B]: the first visible key and the context length */
} Cache;

#define AHEAD 32 /* keys prefetched ahead of the ones being read: their blocks lie scattered over the cache */

INLINE void prefetch_row(const float *row, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm_prefetch((const char *)(row + i), _MM_HINT_T0);
}

/* Lane j of the result is the sum of v[REDUCE_ORDER[j]]'s lanes (the order is its own inverse). */
static const int REDUCE_ORDER[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

INLINE __m512 reduce16(const __m512 *v) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i], x[i + 4], 0x88), _mm512_shuffle_f32x4(x[i], x[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        z[i] = _mm512_add_ps(_mm512_unpacklo_ps(y[i], y[i + 2]), _mm512_unpackhi_ps(y[i], y[i + 2]));
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(z[0]), _mm512_castps_pd(z[1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(z[0]), _mm512_castps_pd(z[1]));
    return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

/* Mask of the 16 lanes from feature i on, of n features (none past the end). */
INLINE __mmask16 lanes(int64_t n, int64_t i) { return i >= n ? 0 : tail(n - i); }

/* s[g][t] = scale * q_g . k_t for G heads (q rows q_head apart, s rows n apart) over n keys; rows holds n
 * pointers, padded to a multiple of 16 (pad rows are read). Each 16 keys are scored for every head while
 * their rows are in L1. */
static void score(float *s, const float *q, int64_t q_head, int64_t G, const float *const *rows, int64_t n,
                  int64_t d, float scale) {
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const float *const *r = rows + t0;
        for (int64_t j = t0 + AHEAD; j < n && j < t0 + AHEAD + 16; j++) prefetch_row(rows[j], d);
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * q_head;
            __m512 acc[16];
            for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t i = 0; i < d; i += 16) {
                __mmask16 m = tail(d - i);
                __m512 qi = _mm512_maskz_loadu_ps(m, qg + i);
                for (int j = 0; j < 16; j++)
                    acc[REDUCE_ORDER[j]] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, r[j] + i), qi, acc[REDUCE_ORDER[j]]);
            }
            _mm512_mask_storeu_ps(s + g * n + t0, tail(n - t0), _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
        }
    }
}

/* out[g][i0 + i] for H heads and 64 features from i0: H x 4 independent accumulators, so the FMAs over the
 * keys do not wait on each other. H is a constant where it is inlined. */
INLINE void weighted_block(float *out, const float *p, const float *const *rows, int64_t n, int64_t dv,
                           int64_t i0, const int H, int prefetch) {
    __m512 acc[4][4];
    __mmask16 m[4];
    for (int c = 0; c < 4; c++) m[c] = lanes(dv, i0 + 16 * c);
    for (int j = 0; j < H; j++)
        for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        if (prefetch && t + AHEAD < n) prefetch_row(rows[t + AHEAD], dv);
        __m512 v[4];
        for (int c = 0; c < 4; c++) v[c] = _mm512_maskz_loadu_ps(m[c], rows[t] + i0 + 16 * c);
        for (int j = 0; j < H; j++) {
            __m512 w = _mm512_set1_ps(p[j * n + t]);
            for (int c = 0; c < 4; c++) acc[j][c] = _mm512_fmadd_ps(w, v[c], acc[j][c]);
        }
    }
    for (int j = 0; j < H; j++)
        for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(out + j * dv + i0 + 16 * c, m[c], acc[j][c]);
}

/* out[g][i] = sum over t of p[g][t] * v_t[i] for G heads (p rows n apart, out rows dv apart): up to four
 * heads share each value load. */
static void weighted_sum(float *out, const float *p, const float *const *rows, int64_t n, int64_t dv, int64_t G) {
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
        for (int64_t i0 = 0; i0 < dv; i0 += 64) {
            const int prefetch = i0 == 0;
            float *o = out + g0 * dv;
            const float *pg = p + g0 * n;
            switch (G - g0 < 4 ? G - g0 : 4) {
            case 1: weighted_block(o, pg, rows, n, dv, i0, 1, prefetch); break;
            case 2: weighted_block(o, pg, rows, n, dv, i0, 2, prefetch); break;
            case 3: weighted_block(o, pg, rows, n, dv, i0, 3, prefetch); break;
            default: weighted_block(o, pg, rows, n, dv, i0, 4, prefetch); break;
            }
        }
    }
}

/* Softmax of n scores in place. */
static void softmax(float *s, int64_t n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) mx = _mm512_mask_max_ps(mx, tail(n - t), mx, _mm512_loadu_ps(s + t));
    __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
        __mmask16 m = tail(n - t);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), top));
        _mm512_mask_storeu_ps(s + t, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t t = 0; t < n; t += 16) {
        __mmask16 m = tail(n - t);
        _mm512_mask_storeu_ps(s + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + t), inv));
    }
}

/* One sequence b, kv head h: q [G, D] at q_row (heads q_head apart) -> out [G, Dv] (rows dv apart). */
static void attend(const Cache *c, int64_t b, int64_t h, const float *q, int64_t q_head, int64_t g_count,
                   int64_t d, int64_t dv, float scale, float *out, float *scores, const float **k_rows,
                   const float **v_rows) {
    const int64_t first = c->first[b], n = c->lens[b] - first;
    const int64_t *table = c->tables + b * c->width;
    for (int64_t t = 0; t < n; t++) {
        int64_t pos = first + t, slot = table[pos / c->block_size] * c->block_size + pos % c->block_size;
        k_rows[t] = c->k + slot * c->k_slot + h * c->k_head;
        v_rows[t] = c->v + slot * c->v_slot + h * c->v_head;
    }
    for (int64_t t = n; t % 16; t++) k_rows[t] = k_rows[n - 1];
    for (int64_t t = 0; t < n && t < AHEAD; t++) {
        prefetch_row(k_rows[t], d);
        prefetch_row(v_rows[t], dv);
    }
    score(scores, q, q_head, g_count, k_rows, n, d, scale);
    for (int64_t g = 0; g < g_count; g++) softmax(scores + g * n, n);
    weighted_sum(out, scores, v_rows, n, dv, g_count);
}

/* q [B, Hq, D] (rows q_row apart, heads q_head apart) -> out [B, Hq, Dv] contiguous. Returns -1 when
 * a thread's scratch could not be allocated. */
int levante_paged_decode(const float *q, int64_t q_row, int64_t q_head, const float *k, const float *v,
                         int64_t k_slot, int64_t k_head, int64_t v_slot, int64_t v_head, const int64_t *tables,
                         int64_t width, int64_t block_size, const int64_t *first, const int64_t *lens, float *out,
                         int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, float scale, int threads) {
    const Cache c = {k, v, k_slot, k_head, v_slot, v_head, tables, width, block_size, first, lens};
    const int64_t G = Hq / Hkv;
    int64_t longest = 16;
    for (int64_t b = 0; b < B; b++) longest = lens[b] - first[b] + 15 > longest ? lens[b] - first[b] + 15 : longest;
    /* Fewer sequences than threads: each sequence's kv heads are shared out among `parts` items. */
    const int64_t parts = B >= threads ? 1 : ((threads + B - 1) / B < Hkv ? (threads + B - 1) / B : Hkv);
    const int64_t per_part = (Hkv + parts - 1) / parts;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(G * longest));
        const float **rows = malloc(sizeof(float *) * (size_t)(2 * longest));
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < B * parts; w++) {
            const int64_t b = w / parts, h0 = (w % parts) * per_part, h1 = h0 + per_part < Hkv ? h0 + per_part : Hkv;
            if (scores == NULL || rows == NULL) {
                failed = 1;
                continue;
            }
            for (int64_t h = h0; h < h1; h++)
                attend(&c, b, h, q + b * q_row + h * G * q_head, q_head, G, D, Dv, scale, out + (b * Hq + h * G) * Dv,
                       scores, rows, rows + longest);
        }
        free(scores);
        free(rows);
    }
    return failed ? -1 : 0;
}
