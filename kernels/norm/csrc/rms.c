/* RMSNorm over float32 rows, on AVX-512: out = w * x / sqrt(mean(x^2) + eps), the mean summed in double.
 * One call where PyTorch's CPU op runs as six (pow, mean, add, rsqrt, two multiplies): a decode step's rows
 * are few, and the calls are most of the time. With `residual`, the row normalized is x + residual, written
 * to `sum` on the way, as a pre-norm decoder layer adds its attention's output between its two norms.
 * kernels/norm/rms.py holds the reference. */
#include <math.h>
#include <omp.h>

#include "simd.h"

static void row(const float *x, const float *residual, float *sum, const float *w, float *out, int64_t dim,
                float eps) {
    const float *src = residual ? sum : x;
    __m512 sq = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
        __mmask16 m = tail(dim - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        if (residual) {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, residual + i));
            _mm512_mask_storeu_ps(sum + i, m, v);
        }
        sq = _mm512_fmadd_ps(v, v, sq);
    }
    const float mean = _mm512_reduce_add_ps(sq) / (float)dim;
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(mean + eps));
    for (int64_t i = 0; i < dim; i += 16) {
        __mmask16 m = tail(dim - i);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + i), inv);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), v));
    }
}

/* x, residual, sum, out [rows, dim] contiguous (residual and sum NULL without the add); w [dim]. */
void levante_rms_norm(const float *x, const float *residual, float *sum, const float *w, float *out, int64_t rows,
                      int64_t dim, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++)
        row(x + r * dim, residual ? residual + r * dim : 0, residual ? sum + r * dim : 0, w, out + r * dim, dim, eps);
}
