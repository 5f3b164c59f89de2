#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
static inline __m256 mask8(const uint8_t *mask, ptrdiff_t i) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i v = _mm256_and_si256(_mm256_set1_epi32(mask[i >> 3]), sel);
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel)), one);
}
/* v0: as the library */
void v0(const float *base, const float *merged, const uint8_t *mask, float *out, ptrdiff_t n) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 prod = _mm256_mul_ps(mask8(mask, i), _mm256_loadu_ps(merged + i));
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(base + i), prod));
    }
}
/* v1: 32 elements an iteration, the mask's 4 bytes loaded once */
void v1(const float *base, const float *merged, const uint8_t *mask, float *out, ptrdiff_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    ptrdiff_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint32_t w; memcpy(&w, mask + i / 8, 4);
        for (int j = 0; j < 4; j++) {
            __m256i v = _mm256_and_si256(_mm256_set1_epi32((w >> (8 * j)) & 0xFF), sel);
            __m256 k = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel)), one);
            __m256 prod = _mm256_mul_ps(k, _mm256_loadu_ps(merged + i + 8 * j));
            _mm256_storeu_ps(out + i + 8 * j, _mm256_add_ps(_mm256_loadu_ps(base + i + 8 * j), prod));
        }
    }
}
/* v2: v1 with aligned non-temporal stores (out 32-byte aligned) */
void v2(const float *base, const float *merged, const uint8_t *mask, float *out, ptrdiff_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    ptrdiff_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint32_t w; memcpy(&w, mask + i / 8, 4);
        for (int j = 0; j < 4; j++) {
            __m256i v = _mm256_and_si256(_mm256_set1_epi32((w >> (8 * j)) & 0xFF), sel);
            __m256 k = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel)), one);
            __m256 prod = _mm256_mul_ps(k, _mm256_loadu_ps(merged + i + 8 * j));
            _mm256_stream_ps(out + i + 8 * j, _mm256_add_ps(_mm256_loadu_ps(base + i + 8 * j), prod));
        }
    }
    _mm_sfence();
}
/* plain add: the traffic floor of 2 in, 1 out */
void vadd(const float *base, const float *merged, const uint8_t *mask, float *out, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(base + i), _mm256_loadu_ps(merged + i)));
}
void vcopy(const float *base, const float *merged, const uint8_t *mask, float *out, ptrdiff_t n) {
    memcpy(out, base, n * 4);
}
