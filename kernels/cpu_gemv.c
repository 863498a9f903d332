/* int4 / int8 weight x float activation matmul for x86 CPUs with AVX2: the CPU path of
QuantLinear (loaded by kernels/cpu_gemv.py). Made for decode (a few rows of x), correct for any M.

y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), weights in the layouts of quant/formats.py:
  int4: qweight uint8 [N, K/2], byte j holds k = 2j in its low nibble and k = 2j + 1 in its high
        one; w = (code - zero) * scale per group of G along k, scales and zeros float16 [K/G, N]
        (zeros NULL: symmetric, zero = 8).
  int8: qweight int8 [N, K], w = code * scale[n], scales float16 [N].

Integer inner loop, as llama.cpp does, but with 16-bit activations: each group of x (G for int4,
128 or 32 k for int8) is taken as int16 times a float scale (error at most 2^-16 of the group's
largest |x|: finer than bfloat16). Codes widen to int16 and _mm256_madd_epi16 multiplies and
pair-sums them into int32, one float multiply-add per group per row. For int4, per group
    sum_k x_k (c_k - z) s  =  s * sum_k x_k c_k  -  s z * sum_k x_k,
so the loop sees codes only; x is reordered once per call to match the nibbles (for each 32 k,
the 16 even k then the 16 odd k). Output rows are split across threads with OpenMP; built
against the libgomp that torch has already loaded, the threads are torch's own.
*/
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define MR 4 /* rows of x per pass over a weight row: their accumulators stay in registers */

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

/* x [M, K] -> xq int16 [M, K] (for int4 reordered per 32 k: evens, then odds), xscale and xsum
   float [M, K/XG] per group of XG k. */
static void prepare_x(const void *x, int dtype, int64_t M, int64_t K, int64_t XG, int reorder,
                      int16_t *xq, float *xscale, float *xsum) {
    const int64_t ngroups = K / XG;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ngroups; g++) {
            float amax = 0.0f;
            int finite = 1;
            for (int64_t k = g * XG; k < (g + 1) * XG; k++) {
                const float a = fabsf(to_float(x, m * K + k, dtype));
                finite &= a <= FLT_MAX; /* false for inf and NaN */
                amax = finite ? fmaxf(amax, a) : amax;
            }
            /* A NaN scale carries a non-finite x into the output, as a float matmul would. */
            const float scale = !finite ? NAN : amax > 0.0f ? amax / 32767.0f : 1.0f;
            int32_t sum = 0; /* of the int16 values, so that the zero-point term sees the same x */
            for (int64_t k = g * XG; k < (g + 1) * XG; k++) {
                const int64_t j = k & 31, at = reorder ? (k & ~(int64_t)31) + (j & 1) * 16 + (j >> 1) : k;
                const int16_t q = finite ? (int16_t)lrintf(to_float(x, m * K + k, dtype) / scale) : 0;
                xq[m * K + at] = q;
                sum += q;
            }
            xscale[m * ngroups + g] = scale;
            xsum[m * ngroups + g] = (float)sum * scale;
        }
}

/* out[i] = row n of the int4 W times rows 0..R-1 of xq. R is a constant once inlined, so the
   accumulators live in registers (with a runtime R they spill to memory). */
static inline __attribute__((always_inline)) void
dot_int4(const int R, const uint8_t *row, const int16_t *xq, const float *xscale, const float *xsum,
         const uint16_t *scales, const uint16_t *zeros, int64_t n, int64_t N, int64_t K, int64_t G,
         float *out) {
    const int64_t ngroups = K / G, blocks = G / 32;
    const __m256i low = _mm256_set1_epi16(0x0f);
    __m256 total[R];
    float zterm[R];
    for (int i = 0; i < R; i++) total[i] = _mm256_setzero_ps(), zterm[i] = 0.0f;
    for (int64_t g = 0; g < ngroups; g++) {
        __m256i acc[R]; /* int32: at most G * 15 * 32767 / 8 per lane, below 2^31 */
        for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_si256();
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t k0 = (g * blocks + b) * 32;
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
            total[i] = _mm256_fmadd_ps(_mm256_set1_ps(s * xscale[i * ngroups + g]),
                                       _mm256_cvtepi32_ps(acc[i]), total[i]);
            zterm[i] += s * z * xsum[i * ngroups + g];
        }
    }
    for (int i = 0; i < R; i++) out[i] = hsum(total[i]) - zterm[i];
}

/* M = 1, the decode case: rows n..n+3 of the int4 W times x, into out[0..3]. The four rows share
   each load of x, and at the end of a group their four sums are reduced together (one add tree,
   their four scales loaded at once), which halves the time of a call at G = 128 against one row
   at a time, where a group's epilogue cost as much as its 4 blocks of products. */
#define PREFETCH_ROWS 4 /* the next pass's rows: DRAM-bound layers (lm_head) went from 13 to 8 ms */
static inline void dot_int4_rows4(const uint8_t *row, const int16_t *xq, const float *xscale,
                                  const float *xsum, const uint16_t *scales,
                                  const uint16_t *zeros, int64_t n, int64_t N, int64_t K,
                                  int64_t G, float *out) {
    const int64_t ngroups = K / G, blocks = G / 32, stride = K / 2;
    const __m256i low = _mm256_set1_epi16(0x0f);
    __m128 total = _mm_setzero_ps();
    for (int64_t g = 0; g < ngroups; g++) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        const uint8_t *w = row + g * (G / 2);
        const int16_t *xp = xq + g * G;
        for (int64_t b = 0; b < blocks; b++, w += 16, xp += 32) {
            const __m256i xe = _mm256_load_si256((const __m256i *)xp);
            const __m256i xo = _mm256_load_si256((const __m256i *)(xp + 16));
#define ROW(a, r)                                                                                  \
    do {                                                                                           \
        _mm_prefetch((const char *)(w + (r + PREFETCH_ROWS) * stride), _MM_HINT_T0);             \
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + (r) * stride))); \
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_and_si256(v, low), xe));                \
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_srli_epi16(v, 4), xo));                 \
    } while (0)
            ROW(a0, 0); ROW(a1, 1); ROW(a2, 2); ROW(a3, 3);
#undef ROW
        }
        /* hadd twice: each 128-bit lane holds the lane's partial sums of rows 0..3 */
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
        const __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        const __m128 s = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scales + g * N + n)));
        const __m128 z = zeros ? _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(zeros + g * N + n)))
                               : _mm_set1_ps(8.0f);
        total = _mm_fmadd_ps(_mm_mul_ps(s, _mm_set1_ps(xscale[g])), _mm_cvtepi32_ps(sum), total);
        total = _mm_fnmadd_ps(_mm_mul_ps(s, z), _mm_set1_ps(xsum[g]), total);
    }
    _mm_storeu_ps(out, total);
}

/* The same for an int8 row, x in groups of XG (a multiple of 32); the row's scale is applied
   by the caller. */
static inline __attribute__((always_inline)) void
dot_int8(const int R, const int8_t *row, const int16_t *xq, const float *xscale, int64_t K,
         int64_t XG, float *out) {
    const int64_t ngroups = K / XG, blocks = XG / 32;
    __m256 total[R];
    for (int i = 0; i < R; i++) total[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ngroups; g++) {
        __m256i acc[R]; /* int32: at most XG * 127 * 32767 / 8 per lane, below 2^31 */
        for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_si256();
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t k0 = (g * blocks + b) * 32;
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k0)));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k0 + 16)));
            for (int i = 0; i < R; i++) {
                const int16_t *xp = xq + i * K + k0;
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(w0, _mm256_load_si256((const __m256i *)xp)));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(w1, _mm256_load_si256((const __m256i *)(xp + 16))));
            }
        }
        for (int i = 0; i < R; i++)
            total[i] = _mm256_fmadd_ps(_mm256_set1_ps(xscale[i * ngroups + g]),
                                       _mm256_cvtepi32_ps(acc[i]), total[i]);
    }
    for (int i = 0; i < R; i++) out[i] = hsum(total[i]);
}

#define ROWS_SWITCH(r, CALL)                              \
    switch (r) {                                          \
    case 1: CALL(1); break;                               \
    case 2: CALL(2); break;                               \
    case 3: CALL(3); break;                               \
    default: CALL(4); break;                              \
    }

/* bits 4: group_size G (a multiple of 32), K % G == 0. bits 8: K % 32 == 0, group_size unused.
   Returns 0, or -1 if scratch memory could not be had. */
int quant_matmul(const void *x, int x_dtype, int bits, const void *qweight,
                 const uint16_t *scales, const uint16_t *zeros, const void *bias, int bias_dtype,
                 void *y, int y_dtype, int64_t M, int64_t N, int64_t K, int64_t G) {
    const int64_t XG = bits == 4 ? G : (K % 128 == 0 ? 128 : 32), ngroups = K / XG;
    const size_t bytes = ((size_t)(M * K * 2 + M * ngroups * 8) + 31) & ~(size_t)31;
    int16_t *xq = aligned_alloc(32, bytes); /* the size must be a multiple of the alignment */
    if (!xq) return -1;
    float *xscale = (float *)(xq + M * K), *xsum = xscale + M * ngroups;
    prepare_x(x, x_dtype, M, K, XG, bits == 4, xq, xscale, xsum);

    if (bits == 4 && M == 1) { /* decode: four rows of W at a time, the rest one by one */
        const int64_t N4 = N & ~(int64_t)3;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N4; n += 4) {
            float out[4];
            dot_int4_rows4((const uint8_t *)qweight + n * (K / 2), xq, xscale, xsum, scales, zeros,
                           n, N, K, G, out);
            for (int i = 0; i < 4; i++)
                store(y, n + i, bias ? out[i] + to_float(bias, n + i, bias_dtype) : out[i], y_dtype);
        }
        for (int64_t n = N4; n < N; n++) {
            float out[1];
            dot_int4(1, (const uint8_t *)qweight + n * (K / 2), xq, xscale, xsum, scales, zeros, n,
                     N, K, G, out);
            store(y, n, bias ? out[0] + to_float(bias, n, bias_dtype) : out[0], y_dtype);
        }
        free(xq);
        return 0;
    }

#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int16_t *xm = xq + m0 * K;
            const float *cm = xscale + m0 * ngroups, *sm = xsum + m0 * ngroups;
            const int64_t r = M - m0 < MR ? M - m0 : MR;
            float out[MR];
            if (bits == 4) {
                const uint8_t *row = (const uint8_t *)qweight + n * (K / 2);
#define CALL4(R) dot_int4(R, row, xm, cm, sm, scales, zeros, n, N, K, G, out)
                ROWS_SWITCH(r, CALL4)
            } else {
                const int8_t *row = (const int8_t *)qweight + n * K;
#define CALL8(R) dot_int8(R, row, xm, cm, K, XG, out)
                ROWS_SWITCH(r, CALL8)
                const float s = _cvtsh_ss(scales[n]);
                for (int64_t i = 0; i < r; i++) out[i] *= s;
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
