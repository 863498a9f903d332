/* int4 x float GEMV for x86 CPUs with AVX2 and FMA: the CPU decode path (kernels/cpu_gemv.py).

y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m, with w = (code - zero) * scale per group of G
along k, in the layout of quant/formats.py: qweight uint8 [N, K/2] (byte j holds k = 2j in its
low nibble, k = 2j + 1 in its high one), scales and zeros float16 [K/G, N] (zeros NULL:
symmetric, zero = 8). All math is float32, so the result is the float32 reference's up to
summation order.

Per group:  sum_k x_k (c_k - z) s  =  s * sum_k x_k c_k  -  s z * sum_k x_k,
so the inner loop is codes times x only: 16 bytes (32 codes) become four vectors of 8 floats,
multiplied into x taken in the same order (x is reordered once per call: for each 32 k, the
16 even k then the 16 odd k). Output rows are split across threads with OpenMP; built against
the libgomp that torch has already loaded, the threads are torch's own.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define MR 4 /* rows of x handled per pass over a weight row (accumulators stay in registers) */

static inline float to_float(const void *p, int64_t i, int dtype) {
    if (dtype == F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (dtype == F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store(void *p, int64_t i, float f, int dtype) {
    if (dtype == F32) { ((float *)p)[i] = f; return; }
    if (dtype == F16) { ((uint16_t *)p)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); return; }
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) { ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40); return; }
    u += 0x7fff + ((u >> 16) & 1); /* round to nearest even, as torch does */
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[i] = row n of W times rows 0..R-1 of the int16 x, for a constant R: once inlined with R
   known, the accumulators live in registers (with a runtime R they spill to memory). */
static inline __attribute__((always_inline)) void
dot_rows(const int R, const uint8_t *row, const int16_t *xq, const float *xscale, const float *xsum,
         const uint16_t *scales, const uint16_t *zeros, int64_t n, int64_t N, int64_t K, int64_t G,
         float *out) {
    const int64_t ngroups = K / G, blocks = G / 32;
    const __m256i low = _mm256_set1_epi16(0x0f);
    __m256 total[R];
    float zterm[R];
    for (int i = 0; i < R; i++) total[i] = _mm256_setzero_ps(), zterm[i] = 0.0f;
    for (int64_t g = 0; g < ngroups; g++) {
        __m256i acc[R]; /* int32 sums of code * x_int16 over the group: at most 2^27 */
        for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_si256();
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t k0 = (g * blocks + b) * 32;
            /* 16 bytes -> 16 int16 lanes; low nibbles are the even k, high nibbles the odd k */
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + k0 / 2)));
            const __m256i even = _mm256_and_si256(v, low), odd = _mm256_srli_epi16(v, 4);
            for (int i = 0; i < R; i++) {
                const int16_t *xp = xq + i * K + k0;
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(even, _mm256_load_si256((const __m256i *)xp)));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(odd, _mm256_load_si256((const __m256i *)(xp + 16))));
            }
        }
        const float s = _cvtsh_ss(scales[g * N + n]);
        const float z = zeros ? _cvtsh_ss(zeros[g * N + n]) : 8.0f;
        for (int i = 0; i < R; i++) {
            const __m256 vs = _mm256_set1_ps(s * xscale[i * ngroups + g]);
            total[i] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(acc[i]), total[i]);
            zterm[i] += s * z * xsum[i * ngroups + g];
        }
    }
    for (int i = 0; i < R; i++) out[i] = hsum(total[i]) - zterm[i];
}

/* Returns 0, or -1 if scratch memory could not be had. */
int int4_gemv(const void *x, int x_dtype, const uint8_t *qweight, const uint16_t *scales,
              const uint16_t *zeros, const void *bias, int bias_dtype, void *y, int y_dtype,
              int64_t M, int64_t N, int64_t K, int64_t G) {
    const int64_t ngroups = K / G;
    /* x per group as int16 times a float scale (error at most 2^-16 of the group's largest
       |x|, finer than bfloat16), reordered as the codes come out; and its float sums */
    const size_t bytes = ((size_t)(M * K * 2 + M * ngroups * 8) + 31) & ~(size_t)31;
    int16_t *xq = aligned_alloc(32, bytes); /* size: a multiple of the alignment */
    if (!xq) return -1;
    float *xscale = (float *)(xq + M * K), *xsum = xscale + M * ngroups;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ngroups; g++) {
            float s = 0.0f, amax = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) {
                float v = to_float(x, m * K + k, x_dtype);
                s += v;
                amax = fabsf(v) > amax ? fabsf(v) : amax;
            }
            const float scale = amax > 0.0f ? amax / 32767.0f : 1.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) {
                int64_t base = k & ~(int64_t)31, j = k & 31;
                xq[m * K + base + (j & 1) * 16 + (j >> 1)] =
                    (int16_t)lrintf(to_float(x, m * K + k, x_dtype) / scale);
            }
            xscale[m * ngroups + g] = scale;
            xsum[m * ngroups + g] = s;
        }

#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = qweight + n * (K / 2);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int16_t *xm = xq + m0 * K;
            const float *cm = xscale + m0 * ngroups, *sm = xsum + m0 * ngroups;
            float out[MR];
            const int64_t r = M - m0 < MR ? M - m0 : MR;
            switch (r) {
            case 1: dot_rows(1, row, xm, cm, sm, scales, zeros, n, N, K, G, out); break;
            case 2: dot_rows(2, row, xm, cm, sm, scales, zeros, n, N, K, G, out); break;
            case 3: dot_rows(3, row, xm, cm, sm, scales, zeros, n, N, K, G, out); break;
            default: dot_rows(4, row, xm, cm, sm, scales, zeros, n, N, K, G, out); break;
            }
            for (int64_t i = 0; i < r; i++) {
                float v = out[i];
                if (bias) v += to_float(bias, n, bias_dtype);
                store(y, (m0 + i) * N + n, v, y_dtype);
            }
        }
    }
    free(xq);
    return 0;
}
