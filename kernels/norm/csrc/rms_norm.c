/* RMSNorm over float32 rows, on AVX-512: out = w * x / sqrt(mean(x^2) + eps), the mean summed in double.
 * One call for a decode step's few rows, where PyTorch's CPU op runs as six (pow, mean, add, rsqrt, two
 * multiplies); kernels/norm/__init__.py holds the reference. With `residual`, x is first added into it
 * (residual += x) and the sum normalized, as a pre-norm decoder layer does between its halves. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

void levante_rms_norm(const float *x, float *residual, const float *w, float *out, int64_t rows, int64_t dim,
                      float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *src = residual != NULL ? residual + r * dim : (float *)xr;
        __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
        for (int64_t i = 0; i < dim; i += 16) {
            __mmask16 m = tail(dim - i);
            __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
            if (residual != NULL) {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, src + i));
                _mm512_mask_storeu_ps(src + i, m, v);
            }
            __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
            lo = _mm512_fmadd_pd(a, a, lo);
            hi = _mm512_fmadd_pd(b, b, hi);
        }
        const double mean = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)) / (double)dim;
        const __m512 inv = _mm512_set1_ps((float)(1.0 / sqrt((double)(float)mean + (double)eps)));
        for (int64_t i = 0; i < dim; i += 16) {
            __mmask16 m = tail(dim - i);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + i), inv);
            _mm512_mask_storeu_ps(out + r * dim + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), v));
        }
    }
}
