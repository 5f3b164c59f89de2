/* tallpack._kernels: the reader's hot loops in C, each one pass over memory.
 *
 * Optional: setup.py builds it when a C compiler is there, and tallpack/kernels.py falls back to
 * numpy and torch (the same bits, more passes) when it is not. Every function takes buffers,
 * checks their sizes, and releases the GIL while it runs, so the archive's threads run it in
 * parallel. None of them allocates.
 *
 *   join_planes(planes, out)             byte planes -> elements (codecs ``bytegroup``, ``planes``)
 *   join_exponent(low, s, t, r, out)     ``planes-exp``'s rotated planes -> float32 / bfloat16
 *   unpack_bits(packed, out)            LSB-first bits -> 0/1 bytes (codec ``bitpack``)
 *   tall_f32(base, merged, mask, out[, bits])
 *                                        out = base + mask * merged (float32; mask 0/1 bytes)
 *   tall_planes(base, rb, merged, rm, mask, out[, bits])
 *                                        the same, base and merged given as their four stored byte
 *                                        planes (``planes``: r = 0; ``planes-exp``: its rotation)
 *   tall_planes_bf16(base, rb, merged, rm, mask, out[, bits])
 *                                        the same for a bfloat16 base (two planes) and output (rounded
 *                                        to nearest even from the float32 sum; AVX2 where the CPU has it)
 *   tall_planes_f16(base, rb, merged, rm, mask, out[, bits])
 *                                        and for float16 (F16C where the CPU has it)
 *
 *   The rebuilds write an output of STREAM_BYTES or more (the module's ``STREAM_BYTES``) with
 *   non-temporal stores where the AVX2 loops run (stream_cut): the same bits, without reading
 *   each output cache line in first.
 *
 *   With ``bits`` true, a rebuild's mask is the stored bit-packed one (codec ``bitpack``: element i
 *   in bit i % 8 of byte i // 8; ceil(n / 8) bytes, padding bits not read), so no byte mask is
 *   written to memory and read back: the AVX2 loops test each lane's bit, the others get the bits
 *   unpacked BITS_BLOCK elements at a time into a buffer on the stack.
 *
 *   tall_mask_f32(tau, merged, lam, mask, state, at)
 *                                        the packer's TALL mask, mask = |tau| > lam * |merged - tau|
 *                                        (float32, as tall.tall_mask), and the fidelity sums of
 *                                        rec = mask * merged against tau, in one pass: elements [at,
 *                                        at + n) of a tensor, added to a task's state in spec 6.4's
 *                                        order (kernels.Sums); returns the set bits
 *   tv_sum(base, thetas, kind, out)      the packer's merged vector for Task Arithmetic, out = ((tau_0 + 0)
 *                                        + tau_1) + ..., tau_t = thetas[t] - base, each widened exactly
 *                                        to float32 (kind 0 float32, 1 bfloat16, 2 float16)
 *   tall_mask_tv(theta, base, kind, merged, lam, mask, state, at)
 *                                        tall_mask_f32 with tau = theta - base computed on the way: the
 *                                        task vectors are never written to memory
 *   max_abs_diff(theta, base, kind)      the largest |theta - base| (a task vector's), as float32 bits
 *                                        (an inf or NaN above every finite value)
 *   ties_hist(theta, base, kind, b, hist)
 *                                        TIES' threshold selection (merging.Ties.prepare): hist[high 16
 *                                        bits of |tau|'s float32 bits] += 1 (b < 0), or, among the elements
 *                                        whose high bits are b, hist[low 16 bits] += 1 (int64 counts)
 *   ties_signs(base, thetas, kind, thr)  the counts of elements whose trimmed sum S = ((+0.0 + r_0) + r_1)
 *                                        + ..., r_t = tau_t where |tau_t| >= thr[t] (else 0), is > 0 and < 0
 *   ties_merge(base, thetas, kind, thr, s0, out, counts)
 *                                        TIES' disjoint sum and counts (spec 6.1.9): out = (+0.0 + k_0) +
 *                                        k_1 + ..., k_t = r_t where its sign is S's (s0's where S is 0)
 *
 *   merge_apply(theta, kind, d, masks, k, counts, alpha, out)
 *                                        a merged model's tensor (merging.apply_direction, with
 *                                        merge_direction's consensus mask or TIES' disjoint mean on the
 *                                        way): out = narrow(widen(theta) + alpha * d'), d' = d * [count of
 *                                        set masks >= k] (no masks: d), / max(counts, 1) (counts given);
 *                                        kind 0-2 as below, 3 float64; returns whether out (1), theta or
 *                                        d' (2) hold an inf or NaN
 *
 *   For these three (and tv_sum, tall_mask_tv, max_abs_diff), tau_t = theta_t - base with both widened
 *   exactly to float32 (kind 0 float32, 1 bfloat16, 2 float16), computed a block at a time on the
 *   stack and never written to memory; an empty base makes the thetas the float32 task vectors.
 *   bitsplit(src, k, heads, low)         codec ``bitsplit``'s split of k-byte unsigned elements (the
 *                                        writer's, exact-tier residuals): each one's head byte, and its
 *                                        low bits as one LSB-first bit stream; returns the stream's bytes
 *   bitjoin(heads, low, k, out)          its inverse (codecs.BitSplit.decode_into): 0, or which check failed
 *   permute_key(src, key, k, shift, bits, out)
 *                                        the exact tier's order (encodings/exact.py): src's k-byte
 *                                        elements in the stable order of (key >> shift) & (2**bits - 1),
 *                                        key's k-byte elements (a counting sort: numpy's stable argsort)
 *   unpermute_key(src, key, k, shift, bits, out)
 *                                        its inverse with the same keys (exact.unpermute)
 *
 * And the manifest's strict JSON checks (container._parse_manifest), which walk Python objects and
 * so hold the GIL; each gives the verdicts of its Python twin in container.py (tests compare them):
 *
 *   json_pairs(pairs)                    json's object_pairs_hook: a dict, ValueError on a duplicate key
 *   json_check(value, numbers, depth)    containers nest less than ``depth`` deep; with ``numbers``,
 *                                        every int in [-2**63, 2**64) and every float finite
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Every loop here rounds each float32 operation to float32 (the same bits as numpy and torch): no
 * wider evaluation (x87), no fused multiply-add (setup.py: -ffp-contract=off; MSVC's pragma below).
 * TALLPACK_PORTABLE builds without the AVX2 paths (the tests build it so, to compare the bits). */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "tallpack._kernels needs float32 arithmetic evaluated in float32 (FLT_EVAL_METHOD 0); the numpy fallbacks run instead"
#endif
#if defined(_MSC_VER) && !defined(__clang__)
#pragma fp_contract(off)
#endif

#define MAX_PLANES 16
/* A mask's length for n elements: n bytes, or ceil(n / 8) bit-packed. */
#define MASK_BYTES(n, bits) ((bits) ? ((n) + 7) / 8 : (n))
/* Elements a bit-packed mask is unpacked for at a time, for loops that read bytes (a multiple of 32,
 * the AVX2 loops' step). */
#define BITS_BLOCK 4096
/* Element i's mask as 0.0f or 1.0f: byte i, or with ``bits`` bit i % 8 of byte i // 8. */
#define MASK_K(mask, i, bits) (((bits) ? ((mask)[(i) >> 3] >> ((i) & 7)) & 1u : (mask)[i]) ? 1.0f : 0.0f)
/* The mask from element i on (i a multiple of 8 when ``bits``). */
#define MASK_FROM(mask, i, bits) ((bits) ? (mask) + ((i) >> 3) : (mask) + (i))

/* The word-at-a-time loops assume little-endian words (the format's byte order); elsewhere, and
 * for misaligned outputs, the byte-at-a-time loops run. */
#if (defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__) || defined(_WIN32)
#define WORDS_OK(ptr, size) ((((uintptr_t)(ptr)) & ((size) - 1)) == 0)
#else
#define WORDS_OK(ptr, size) 0
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && !defined(TALLPACK_PORTABLE)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE static inline
#endif

HOT static void join4(const uint8_t *p0, const uint8_t *p1, const uint8_t *p2, const uint8_t *p3,
                      uint32_t *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 | (uint32_t)p3[i] << 24;
}

HOT static void join2(const uint8_t *p0, const uint8_t *p1, uint16_t *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (uint16_t)(p0[i] | p1[i] << 8);
}

static void join_any(const uint8_t **p, int k, uint8_t *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        for (int j = 0; j < k; j++)
            out[i * k + j] = p[j][i];
}

/* The top 16 bits of an element from planes-exp's S and T of rotation r (codecs.ExponentPlanes):
 * hi = (S & ~keep) | T >> r and lo = (T << (8 - r) & 0xFF) | (S & keep), i.e.
 * hi << 8 | lo = (S & ~keep) << 8 | T << (8 - r) | (S & keep), the three fields disjoint. */
HOT static void join_exp4(const uint8_t *p0, const uint8_t *p1, const uint8_t *s, const uint8_t *t, int r,
                          uint32_t *out, Py_ssize_t n) {
    const uint32_t keep = 0xFFu >> r, high = 0xFFu ^ keep, shift = 24 - r;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t S = s[i];
        out[i] = (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (S & keep) << 16 | (S & high) << 24 | (uint32_t)t[i] << shift;
    }
}

static void join_exp_any(const uint8_t **low, int k, const uint8_t *s, const uint8_t *t, int r,
                         uint8_t *out, Py_ssize_t n) {
    const unsigned keep = 0xFFu >> r, high = 0xFFu ^ keep;
    for (Py_ssize_t i = 0; i < n; i++) {
        for (int j = 0; j < k - 2; j++)
            out[i * k + j] = low[j][i];
        out[i * k + k - 2] = (uint8_t)(((unsigned)t[i] << (8 - r) & 0xFFu) | (s[i] & keep));
        out[i * k + k - 1] = (uint8_t)((s[i] & high) | t[i] >> r);
    }
}

HOT static void join_exp2(const uint8_t *s, const uint8_t *t, int r, uint16_t *out, Py_ssize_t n) {
    const uint32_t keep = 0xFFu >> r, high = 0xFFu ^ keep, shift = 8 - r;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t S = s[i];
        out[i] = (uint16_t)((S & keep) | (S & high) << 8 | (uint32_t)t[i] << shift);
    }
}

/* 0.0f or 1.0f: bit-identical to torch.addcmul(base, mask.float(), merged), since m * merged is
 * exact (merged, or a zero with merged's sign, or NaN for an infinite merged) and the sum is then
 * rounded once, fused or not. */
HOT static void tall_f32_loop(const float *base, const float *merged, const uint8_t *mask, float *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        float m = mask[i] ? 1.0f : 0.0f;
        out[i] = base[i] + m * merged[i];
    }
}

/* One float32 element from its four stored planes: ``planes`` (r = 0: byte j from plane j) or
 * ``planes-exp`` of rotation r (planes 2 and 3 are S and T; see join_exp4, which with r = 0 is
 * the plain join). */
#define PLANE_WORD(p0, p1, s, t, i, keep, high, shift) \
    ((uint32_t)(p0)[i] | (uint32_t)(p1)[i] << 8 | ((uint32_t)(s)[i] & (keep)) << 16 \
     | ((uint32_t)(s)[i] & (high)) << 24 | (uint32_t)(t)[i] << (shift))

/* out = base + m * merged as tall_f32_loop, base and merged joined from their planes on the way:
 * one pass, no decoded copy of either. */
HOT static void tall_planes_loop(const uint8_t *const *b, int rb, const uint8_t *const *m, int rm,
                                 const uint8_t *mask, int bits, float *out, Py_ssize_t n) {
    const uint32_t bkeep = 0xFFu >> rb, bhigh = 0xFFu ^ bkeep, bshift = 24 - rb;
    const uint32_t mkeep = 0xFFu >> rm, mhigh = 0xFFu ^ mkeep, mshift = 24 - rm;
    const uint8_t *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    const uint8_t *m0 = m[0], *m1 = m[1], *m2 = m[2], *m3 = m[3];
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t wb = PLANE_WORD(b0, b1, b2, b3, i, bkeep, bhigh, bshift);
        uint32_t wm = PLANE_WORD(m0, m1, m2, m3, i, mkeep, mhigh, mshift);
        float fb, fm;
        memcpy(&fb, &wb, 4);
        memcpy(&fm, &wm, 4);
        float k = MASK_K(mask, i, bits);
        out[i] = fb + k * fm;
    }
}

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && !defined(TALLPACK_PORTABLE)
#include <immintrin.h>
#define HAVE_AVX2_PLANES 1

/* 32 elements' words from their four planes, in element order: the top two bytes rotated back
 * (byte-wise: hi = (S & high) | T >> r, lo = (T << (8 - r) & 0xFF) | (S & keep)), then bytes
 * interleaved into 16-bit and 32-bit words. AVX2 interleaves within 128-bit halves, which
 * leaves elements [0-3 | 16-19], [4-7 | 20-23], [8-11 | 24-27], [12-15 | 28-31]; one exchange
 * of halves per pair puts them in order. */
__attribute__((target("avx2"))) static inline void words32(const uint8_t *p0, const uint8_t *p1, const uint8_t *s,
                                                           const uint8_t *t, Py_ssize_t i, int r, __m256i w[4]) {
    __m256i b0 = _mm256_loadu_si256((const __m256i *)(p0 + i)), b1 = _mm256_loadu_si256((const __m256i *)(p1 + i));
    __m256i S = _mm256_loadu_si256((const __m256i *)(s + i)), T = _mm256_loadu_si256((const __m256i *)(t + i));
    __m256i lo, hi;
    if (r == 0) {
        lo = S;
        hi = T;
    } else {
        const __m256i keep = _mm256_set1_epi8((char)(0xFF >> r)), high = _mm256_set1_epi8((char)(0xFF ^ (0xFF >> r)));
        const __m256i tlow = _mm256_set1_epi8((char)((0xFF << (8 - r)) & 0xFF));
        __m256i t_down = _mm256_and_si256(_mm256_srl_epi16(T, _mm_cvtsi32_si128(r)), keep);
        __m256i t_up = _mm256_and_si256(_mm256_sll_epi16(T, _mm_cvtsi32_si128(8 - r)), tlow);
        hi = _mm256_or_si256(_mm256_and_si256(S, high), t_down);
        lo = _mm256_or_si256(t_up, _mm256_and_si256(S, keep));
    }
    __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    __m256i l23 = _mm256_unpacklo_epi8(lo, hi), h23 = _mm256_unpackhi_epi8(lo, hi);
    __m256i a = _mm256_unpacklo_epi16(l01, l23), b = _mm256_unpackhi_epi16(l01, l23);
    __m256i c = _mm256_unpacklo_epi16(h01, h23), d = _mm256_unpackhi_epi16(h01, h23);
    w[0] = _mm256_permute2x128_si256(a, b, 0x20);
    w[1] = _mm256_permute2x128_si256(c, d, 0x20);
    w[2] = _mm256_permute2x128_si256(a, b, 0x31);
    w[3] = _mm256_permute2x128_si256(c, d, 0x31);
}

/* Elements i..i+7's mask as 0.0f or 1.0f in eight lanes: from eight bytes, or with ``bits`` from
 * byte i / 8's bits (i a multiple of 8), each lane testing its own bit. */
__attribute__((target("avx2"))) static inline __m256 mask8(const uint8_t *mask, Py_ssize_t i, int bits) {
    const __m256 one = _mm256_set1_ps(1.0f);
    if (bits) {
        const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        __m256i v = _mm256_and_si256(_mm256_set1_epi32(mask[i >> 3]), sel);
        return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel)), one);
    }
    __m256i mk = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mask + i)));
    return _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(mk, _mm256_setzero_si256())), one);
}

/* tall_planes_loop, 32 elements at a time: the same operations (k * merged, then + base, each
 * rounded; no fused multiply-add), so the same bits. With ``stream`` (a constant in each caller:
 * out 32-byte aligned, n a multiple of 32; see stream_cut), written with non-temporal stores. */
ALWAYS_INLINE __attribute__((target("avx2"))) void tall_planes_avx2_body(const uint8_t *const *b, int rb,
                                                                      const uint8_t *const *m, int rm,
                                                                      const uint8_t *mask, int bits, float *out,
                                                                      Py_ssize_t n, int stream) {
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i wb[4], wm[4];
        words32(b[0], b[1], b[2], b[3], i, rb, wb);
        words32(m[0], m[1], m[2], m[3], i, rm, wm);
        for (int j = 0; j < 4; j++) {
            __m256 k = mask8(mask, i + 8 * j, bits);
            __m256 sum = _mm256_add_ps(_mm256_castsi256_ps(wb[j]), _mm256_mul_ps(k, _mm256_castsi256_ps(wm[j])));
            if (stream)
                _mm256_stream_ps(out + i + 8 * j, sum);
            else
                _mm256_storeu_ps(out + i + 8 * j, sum);
        }
    }
    if (stream)
        _mm_sfence();
    else if (i < n) {
        const uint8_t *bt[4] = {b[0] + i, b[1] + i, b[2] + i, b[3] + i};
        const uint8_t *mt[4] = {m[0] + i, m[1] + i, m[2] + i, m[3] + i};
        tall_planes_loop(bt, rb, mt, rm, MASK_FROM(mask, i, bits), bits, out + i, n - i);
    }
}

__attribute__((target("avx2"))) static void tall_planes_avx2(const uint8_t *const *b, int rb, const uint8_t *const *m,
                                                             int rm, const uint8_t *mask, int bits, float *out,
                                                             Py_ssize_t n) {
    tall_planes_avx2_body(b, rb, m, rm, mask, bits, out, n, 0);
}

__attribute__((target("avx2"))) static void tall_planes_avx2_stream(const uint8_t *const *b, int rb,
                                                                    const uint8_t *const *m, int rm,
                                                                    const uint8_t *mask, int bits, float *out,
                                                                    Py_ssize_t n) {
    tall_planes_avx2_body(b, rb, m, rm, mask, bits, out, n, 1);
}
#endif

/* Outputs of at least STREAM_BYTES (one call's) are written with non-temporal stores where the
 * AVX2 loops run: each cache line is written whole, without first being read in, and is not kept
 * in the cache (a fresh output's lines, which nothing holds yet, cost a read each otherwise). The
 * bits are the same either way. */
#define STREAM_BYTES (1 << 20)

#ifdef HAVE_AVX2_PLANES

/* Cuts n elements of ``size`` bytes at ``out`` for a streamed write: a head up to out's first
 * 32-byte boundary, a body of whole 32-element steps (non-temporal), the rest. 0: not streamed
 * (too small, or, for a bit-packed mask, a head that is not whole mask bytes). */
static int stream_cut(const void *out, int size, Py_ssize_t n, int bits, Py_ssize_t *head, Py_ssize_t *body) {
    if (n < STREAM_BYTES / size || (uintptr_t)out % (uintptr_t)size)
        return 0;
    Py_ssize_t h = (Py_ssize_t)((32 - ((uintptr_t)out & 31)) & 31) / size;
    if (bits && h % 8)
        return 0;
    *head = h;
    *body = (n - h) / 32 * 32;
    return 1;
}

/* Planes p[0..3] (NULL stays NULL) from element a on, into q. */
static void planes_from(const uint8_t *const *p, Py_ssize_t a, const uint8_t **q) {
    for (int j = 0; j < 4; j++)
        q[j] = p[j] != NULL ? p[j] + a : NULL;
}
#endif

#ifdef HAVE_AVX2_PLANES
/* tall_f32_loop reading the mask's bits (mask8), 8 elements at a time: k * merged, then + base,
 * each rounded, as the byte loop does. */
__attribute__((target("avx2"))) static void tall_f32_bits_avx2(const float *base, const float *merged,
                                                               const uint8_t *mask, float *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 prod = _mm256_mul_ps(mask8(mask, i, 1), _mm256_loadu_ps(merged + i));
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(base + i), prod));
    }
    for (; i < n; i++)
        out[i] = base[i] + MASK_K(mask, i, 1) * merged[i];
}

/* The same (mask bytes or bits), 32 elements at a time with non-temporal stores: out 32-byte
 * aligned, n a multiple of 32 (stream_cut). */
__attribute__((target("avx2"))) static void tall_f32_stream(const float *base, const float *merged,
                                                            const uint8_t *mask, int bits, float *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i + 32 <= n; i += 32)
        for (int j = 0; j < 4; j++) {
            __m256 prod = _mm256_mul_ps(mask8(mask, i + 8 * j, bits), _mm256_loadu_ps(merged + i + 8 * j));
            _mm256_stream_ps(out + i + 8 * j, _mm256_add_ps(_mm256_loadu_ps(base + i + 8 * j), prod));
        }
    _mm_sfence();
}
#endif

static void tall_planes_any(const uint8_t *const *b, int rb, const uint8_t *const *m, int rm,
                            const uint8_t *mask, int bits, float *out, Py_ssize_t n) {
#ifdef HAVE_AVX2_PLANES
    if (__builtin_cpu_supports("avx2")) {
        Py_ssize_t h, body;
        if (stream_cut(out, 4, n, bits, &h, &body)) {
            const uint8_t *bt[4], *mt[4];
            tall_planes_avx2(b, rb, m, rm, mask, bits, out, h);
            planes_from(b, h, bt);
            planes_from(m, h, mt);
            tall_planes_avx2_stream(bt, rb, mt, rm, MASK_FROM(mask, h, bits), bits, out + h, body);
            planes_from(b, h + body, bt);
            planes_from(m, h + body, mt);
            tall_planes_avx2(bt, rb, mt, rm, MASK_FROM(mask, h + body, bits), bits, out + h + body, n - h - body);
        } else {
            tall_planes_avx2(b, rb, m, rm, mask, bits, out, n);
        }
        return;
    }
#endif
    tall_planes_loop(b, rb, m, rm, mask, bits, out, n);
}

/* float32 -> bfloat16, rounding to nearest even as torch's Tensor.to(torch.bfloat16); a NaN gives
 * 0xFFFF, as torch's vectorized conversion does (the format leaves a NaN's payload open). */
static inline uint16_t bf16_rne(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0xFFFFu : rounded;
}

/* float16 <-> float32 in IEEE 754, exactly as torch converts (float16 -> float32 is exact;
 * float32 -> float16 rounds to nearest even, overflowing to infinity, through the subnormals); a
 * NaN stays a NaN (its payload open, spec §6.1.1: narrowed as F16C narrows it, so the scalar and
 * F16C loops agree). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
    if (e == 0x1F)
        bits = sign | 0x7F800000u | (m << 13);
    else if (e)
        bits = sign | ((e + 112) << 23) | (m << 13);
    else if (m == 0)
        bits = sign;
    else {
        float v = (float)m * 0x1p-24f; /* exact: m < 1024 */
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f16_rne(float v) {
    uint32_t x;
    memcpy(&x, &v, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) /* NaN: quiet, its payload's top 10 bits kept, as F16C's vcvtps2ph (every build the same bits) */
        return sign | 0x7E00u | (uint16_t)((ax >> 13) & 0x3FFu);
    if (ax >= 0x477FF000u)     /* 65520 and up (the halfway point past 65504): infinity */
        return sign | 0x7C00u;
    if (ax < 0x38800000u) {    /* below 2^-14: a subnormal or zero, in units of 2^-24 */
        if (ax <= 0x33000000u) /* up to 2^-25, the tie with zero: zero */
            return sign;
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        q += rem > half || (rem == half && (q & 1));
        return sign | (uint16_t)q;
    }
    uint32_t r = ax + 0xFFFu + ((ax >> 13) & 1u); /* round the 13 dropped bits to nearest even */
    return sign | (uint16_t)((r - 0x38000000u) >> 13);
}

/* The rebuild from planes for a 16-bit base and output: the base from its two stored planes
 * (``planes``: r = 0, byte j from plane j; ``planes-exp``: S and T of rotation r, see join_exp2),
 * widened to float32 exactly, plus k * merged (float32, from its four planes) in float32, then
 * rounded to the 16-bit type: torch's addcmul(base.float(), mask.float(), merged).to(dtype), bit
 * for bit (a NaN's payload aside). ``f16`` is a constant in each caller below, so each gets its
 * own loop (bfloat16's vectorizes, reading a byte mask: bits 0). */
ALWAYS_INLINE void tall_planes_16_body(const uint8_t *bs, const uint8_t *bt, int rb, const uint8_t *const *m, int rm,
                                       const uint8_t *mask, int bits, uint16_t *out, Py_ssize_t n, int f16) {
    const uint32_t bkeep = 0xFFu >> rb, bhigh = 0xFFu ^ bkeep, bshift = 8 - rb;
    const uint32_t mkeep = 0xFFu >> rm, mhigh = 0xFFu ^ mkeep, mshift = 24 - rm;
    const uint8_t *m0 = m[0], *m1 = m[1], *m2 = m[2], *m3 = m[3];
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t S = bs[i];
        uint16_t h = (uint16_t)((S & bkeep) | (S & bhigh) << 8 | (uint32_t)bt[i] << bshift);
        uint32_t wb = (uint32_t)h << 16, wm = PLANE_WORD(m0, m1, m2, m3, i, mkeep, mhigh, mshift);
        float fb, fm;
        memcpy(&fb, &wb, 4);
        memcpy(&fm, &wm, 4);
        if (f16)
            fb = f16_to_f32(h);
        float k = MASK_K(mask, i, bits), sum = fb + k * fm;
        out[i] = f16 ? f16_rne(sum) : bf16_rne(sum);
    }
}

HOT static void tall_planes_bf16_loop(const uint8_t *bs, const uint8_t *bt, int rb, const uint8_t *const *m, int rm,
                                      const uint8_t *mask, uint16_t *out, Py_ssize_t n) {
    tall_planes_16_body(bs, bt, rb, m, rm, mask, 0, out, n, 0);
}

static void tall_planes_f16_loop(const uint8_t *bs, const uint8_t *bt, int rb, const uint8_t *const *m, int rm,
                                 const uint8_t *mask, int bits, uint16_t *out, Py_ssize_t n) {
    tall_planes_16_body(bs, bt, rb, m, rm, mask, bits, out, n, 1);
}

#ifdef HAVE_AVX2_PLANES
/* bfloat16_rne on eight lanes: round to nearest even, a NaN to 0xFFFF; the results in the low 16
 * bits of each 32-bit lane. */
__attribute__((target("avx2"))) static inline __m256i bf16_rne8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    /* a NaN lane (unordered with itself, whatever MXCSR says) all ones, so 0xFFFF once shifted */
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_srli_epi32(_mm256_or_si256(t, nan), 16);
}

/* tall_planes_bf16_loop and tall_planes_f16_loop, 32 elements at a time: the base widened exactly
 * (bfloat16: a shift; float16: F16C), k * merged, then + base, each rounded as the scalar loop
 * rounds, then to the 16-bit type, rounding to nearest even (F16C for float16, bf16_rne8 for
 * bfloat16): the same bits as the scalar loops, NaN payloads aside. ``f16`` is a constant in each
 * caller below. */
ALWAYS_INLINE __attribute__((target("avx2,f16c"))) void tall_planes_16_avx2(const uint8_t *bs, const uint8_t *bt,
                                                                          int rb, const uint8_t *const *m, int rm,
                                                                          const uint8_t *mask, int bits,
                                                                          uint16_t *out, Py_ssize_t n, int f16,
                                                                          int stream) {
    const __m128i keep = _mm_set1_epi8((char)(0xFF >> rb)), high = _mm_set1_epi8((char)(0xFF ^ (0xFF >> rb)));
    const __m128i tlow = _mm_set1_epi8((char)((0xFF << (8 - rb)) & 0xFF));
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i wm[4];
        __m128i h[4];
        words32(m[0], m[1], m[2], m[3], i, rm, wm);
        for (int half = 0; half < 2; half++) {
            __m128i S = _mm_loadu_si128((const __m128i *)(bs + i + 16 * half));
            __m128i T = _mm_loadu_si128((const __m128i *)(bt + i + 16 * half));
            __m128i lo = S, hi = T;
            if (rb) {
                hi = _mm_or_si128(_mm_and_si128(S, high), _mm_and_si128(_mm_srl_epi16(T, _mm_cvtsi32_si128(rb)), keep));
                lo = _mm_or_si128(_mm_and_si128(_mm_sll_epi16(T, _mm_cvtsi32_si128(8 - rb)), tlow), _mm_and_si128(S, keep));
            }
            h[2 * half] = _mm_unpacklo_epi8(lo, hi);
            h[2 * half + 1] = _mm_unpackhi_epi8(lo, hi);
        }
        __m256 sum[4];
        for (int j = 0; j < 4; j++) {
            __m256 k = mask8(mask, i + 8 * j, bits);
            __m256 fb = f16 ? _mm256_cvtph_ps(h[j])
                            : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h[j]), 16));
            sum[j] = _mm256_add_ps(fb, _mm256_mul_ps(k, _mm256_castsi256_ps(wm[j])));
            if (f16 && stream)
                _mm_stream_si128((__m128i *)(out + i + 8 * j), _mm256_cvtps_ph(sum[j], _MM_FROUND_TO_NEAREST_INT));
            else if (f16)
                _mm_storeu_si128((__m128i *)(out + i + 8 * j), _mm256_cvtps_ph(sum[j], _MM_FROUND_TO_NEAREST_INT));
        }
        if (!f16) {  /* sixteen results at a time: packed (per 128-bit half), then put in order */
            for (int j = 0; j < 4; j += 2) {
                __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_rne8(sum[j]), bf16_rne8(sum[j + 1])), 0xD8);
                if (stream)
                    _mm256_stream_si256((__m256i *)(out + i + 8 * j), p);
                else
                    _mm256_storeu_si256((__m256i *)(out + i + 8 * j), p);
            }
        }
    }
    if (stream)
        _mm_sfence();
    else if (i < n) {
        const uint8_t *mt[4] = {m[0] + i, m[1] + i, m[2] + i, m[3] + i};  /* at most 31: the scalar body */
        tall_planes_16_body(bs + i, bt + i, rb, mt, rm, MASK_FROM(mask, i, bits), bits, out + i, n - i, f16);
    }
}

__attribute__((target("avx2,f16c"))) static void tall_planes_f16_avx2(const uint8_t *bs, const uint8_t *bt, int rb,
                                                                     const uint8_t *const *m, int rm,
                                                                     const uint8_t *mask, int bits, uint16_t *out,
                                                                     Py_ssize_t n) {
    tall_planes_16_avx2(bs, bt, rb, m, rm, mask, bits, out, n, 1, 0);
}

__attribute__((target("avx2,f16c"))) static void tall_planes_bf16_avx2(const uint8_t *bs, const uint8_t *bt, int rb,
                                                                      const uint8_t *const *m, int rm,
                                                                      const uint8_t *mask, int bits, uint16_t *out,
                                                                      Py_ssize_t n) {
    tall_planes_16_avx2(bs, bt, rb, m, rm, mask, bits, out, n, 0, 0);
}

/* The two with non-temporal stores: out 32-byte aligned, n a multiple of 32 (stream_cut). */
__attribute__((target("avx2,f16c"))) static void tall_planes_16_avx2_stream(const uint8_t *bs, const uint8_t *bt,
                                                                           int rb, const uint8_t *const *m, int rm,
                                                                           const uint8_t *mask, int bits,
                                                                           uint16_t *out, Py_ssize_t n, int f16) {
    if (f16)
        tall_planes_16_avx2(bs, bt, rb, m, rm, mask, bits, out, n, 1, 1);
    else
        tall_planes_16_avx2(bs, bt, rb, m, rm, mask, bits, out, n, 0, 1);
}
#endif

/* The 16-bit rebuilds: AVX2 where there (reading bits or bytes), else the scalar loops; bfloat16's,
 * which the compiler vectorizes, reads bytes (the caller unpacks bits a block at a time: reads_bits). */
static void tall_planes_16_any(const uint8_t *bs, const uint8_t *bt, int rb, const uint8_t *const *m, int rm,
                               const uint8_t *mask, int bits, uint16_t *out, Py_ssize_t n, int f16) {
#ifdef HAVE_AVX2_PLANES
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
        void (*run)(const uint8_t *, const uint8_t *, int, const uint8_t *const *, int, const uint8_t *, int,
                    uint16_t *, Py_ssize_t) = f16 ? tall_planes_f16_avx2 : tall_planes_bf16_avx2;
        Py_ssize_t h, body;
        if (stream_cut(out, 2, n, bits, &h, &body)) {
            const uint8_t *mt[4];
            run(bs, bt, rb, m, rm, mask, bits, out, h);
            planes_from(m, h, mt);
            tall_planes_16_avx2_stream(bs + h, bt + h, rb, mt, rm, MASK_FROM(mask, h, bits), bits, out + h, body, f16);
            h += body;
            planes_from(m, h, mt);
            run(bs + h, bt + h, rb, mt, rm, MASK_FROM(mask, h, bits), bits, out + h, n - h);
        } else {
            run(bs, bt, rb, m, rm, mask, bits, out, n);
        }
        return;
    }
#endif
    if (f16)
        tall_planes_f16_loop(bs, bt, rb, m, rm, mask, bits, out, n);
    else
        tall_planes_bf16_loop(bs, bt, rb, m, rm, mask, out, n);
}

/* Byte b's eight elements as 0/1 bytes, LSB first: one 8-byte copy per stored byte. */
static uint8_t UNPACKED[256][8];

static void init_unpacked(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++)
            UNPACKED[b][j] = (uint8_t)((b >> j) & 1);
}

static void unpack_loop(const uint8_t *packed, uint8_t *out, Py_ssize_t n) {
    Py_ssize_t whole = n / 8;
    for (Py_ssize_t i = 0; i < whole; i++)
        memcpy(out + 8 * i, UNPACKED[packed[i]], 8);
    for (Py_ssize_t i = whole * 8; i < n; i++)
        out[i] = (uint8_t)((packed[i / 8] >> (i % 8)) & 1u);
}

/* The writer's side of join4/join2 and join_exp4/join_exp2: elements into byte planes, and with
 * r >= 1 the two top planes stored as planes-exp's S (plane k - 2) and T (plane k - 1):
 * T = (hi << r | lo >> (8 - r)) & 0xFF, S = (hi & ~keep) | (lo & keep), keep = 0xFF >> r. */
HOT static void split4(const uint32_t *src, uint8_t *out, Py_ssize_t n, int r) {
    uint8_t *o0 = out, *o1 = out + n, *o2 = out + 2 * n, *o3 = out + 3 * n;
    if (r == 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t v = src[i];
            o0[i] = (uint8_t)v; o1[i] = (uint8_t)(v >> 8); o2[i] = (uint8_t)(v >> 16); o3[i] = (uint8_t)(v >> 24);
        }
        return;
    }
    const uint32_t keep = 0xFFu >> r, high = 0xFFu ^ keep;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v = src[i], lo = (v >> 16) & 0xFFu, hi = v >> 24;
        o0[i] = (uint8_t)v; o1[i] = (uint8_t)(v >> 8);
        o2[i] = (uint8_t)((hi & high) | (lo & keep));
        o3[i] = (uint8_t)((hi << r | lo >> (8 - r)) & 0xFFu);
    }
}

HOT static void split2(const uint16_t *src, uint8_t *out, Py_ssize_t n, int r) {
    uint8_t *o0 = out, *o1 = out + n;
    if (r == 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t v = src[i];
            o0[i] = (uint8_t)v; o1[i] = (uint8_t)(v >> 8);
        }
        return;
    }
    const uint32_t keep = 0xFFu >> r, high = 0xFFu ^ keep;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v = src[i], lo = v & 0xFFu, hi = v >> 8;
        o0[i] = (uint8_t)((hi & high) | (lo & keep));
        o1[i] = (uint8_t)((hi << r | lo >> (8 - r)) & 0xFFu);
    }
}

static void split_any(const uint8_t *src, int k, uint8_t *out, Py_ssize_t n, int r) {
    const unsigned keep = 0xFFu >> r, high = 0xFFu ^ keep;
    for (Py_ssize_t i = 0; i < n; i++) {
        for (int j = 0; j < k; j++)
            out[j * n + i] = src[i * k + j];
        if (r) {
            unsigned lo = src[i * k + k - 2], hi = src[i * k + k - 1];
            out[(k - 2) * n + i] = (uint8_t)((hi & high) | (lo & keep));
            out[(k - 1) * n + i] = (uint8_t)((hi << r | lo >> (8 - r)) & 0xFFu);
        }
    }
}

static PyObject *split_planes(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    int k, r;
    if (!PyArg_ParseTuple(args, "y*iiw*:split_planes", &src, &k, &r, &out))
        return NULL;
    if (k < 1 || k > MAX_PLANES || src.len % k || out.len != src.len || r < 0 || r > 7 || (r && k < 2)) {
        PyErr_Format(PyExc_ValueError, "split_planes: %zd bytes of %d-byte elements into %zd, rotation %d",
                     src.len, k, out.len, r);
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_ssize_t n = src.len / k;
    Py_BEGIN_ALLOW_THREADS
    if (k == 4 && WORDS_OK(src.buf, 4))
        split4((const uint32_t *)src.buf, (uint8_t *)out.buf, n, r);
    else if (k == 2 && WORDS_OK(src.buf, 2))
        split2((const uint16_t *)src.buf, (uint8_t *)out.buf, n, r);
    else
        split_any((const uint8_t *)src.buf, k, (uint8_t *)out.buf, n, r);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static void release_all(Py_buffer *views, int k) {
    for (int j = 0; j < k; j++)
        PyBuffer_Release(&views[j]);
}

/* k read-only buffers of n bytes each from a sequence; returns k, or -1 with an exception set. */
static int get_planes(PyObject *seq, Py_buffer *views, Py_ssize_t n, int min_k) {
    PyObject *fast = PySequence_Fast(seq, "planes must be a sequence of buffers");
    if (fast == NULL)
        return -1;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast);
    if (k < min_k || k > MAX_PLANES) {
        PyErr_Format(PyExc_ValueError, "%zd planes (at most %d)", k, MAX_PLANES);
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, j), &views[j], PyBUF_SIMPLE) < 0) {
            release_all(views, (int)j);
            Py_DECREF(fast);
            return -1;
        }
        if (views[j].len != n) {
            PyErr_Format(PyExc_ValueError, "plane %zd has %zd bytes, expected %zd", j, views[j].len, n);
            release_all(views, (int)j + 1);
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return (int)k;
}

static PyObject *join_planes(PyObject *self, PyObject *args) {
    PyObject *seq;
    Py_buffer out, views[MAX_PLANES];
    if (!PyArg_ParseTuple(args, "Ow*:join_planes", &seq, &out))
        return NULL;
    Py_ssize_t k = PySequence_Size(seq);
    if (k < 1 || k > MAX_PLANES || out.len % k) {
        PyBuffer_Release(&out);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%zd planes cannot fill %zd bytes", k, out.len);
        return NULL;
    }
    Py_ssize_t n = out.len / k;
    int got = get_planes(seq, views, n, 1);
    if (got != k) {  /* -1 with an exception, or a sequence whose length changed */
        if (got >= 0) {
            release_all(views, got);
            PyErr_SetString(PyExc_ValueError, "the planes changed while they were read");
        }
        PyBuffer_Release(&out);
        return NULL;
    }
    const uint8_t *p[MAX_PLANES];
    for (int j = 0; j < k; j++)
        p[j] = (const uint8_t *)views[j].buf;
    Py_BEGIN_ALLOW_THREADS
    if (k == 4 && WORDS_OK(out.buf, 4))
        join4(p[0], p[1], p[2], p[3], (uint32_t *)out.buf, n);
    else if (k == 2 && WORDS_OK(out.buf, 2))
        join2(p[0], p[1], (uint16_t *)out.buf, n);
    else
        join_any(p, (int)k, (uint8_t *)out.buf, n);
    Py_END_ALLOW_THREADS
    release_all(views, (int)k);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyObject *join_exponent(PyObject *self, PyObject *args) {
    PyObject *seq;
    Py_buffer s, t, out, views[MAX_PLANES];
    int r;
    if (!PyArg_ParseTuple(args, "Oy*y*iw*:join_exponent", &seq, &s, &t, &r, &out))
        return NULL;
    Py_ssize_t low_n = PySequence_Size(seq), k = low_n + 2, n = 0;
    int low_k = (int)low_n;
    if (low_n < 0)
        goto fail;
    if (!(k == 2 || k == 4) || out.len % k) {
        PyErr_Format(PyExc_ValueError, "planes-exp joins 2- or 4-byte elements, not %zd planes into %zd bytes", k, out.len);
        goto fail;
    }
    n = out.len / k;
    if (s.len != n || t.len != n || r < 1 || r > 7) {
        PyErr_Format(PyExc_ValueError, "planes-exp: planes of %zd and %zd bytes, rotation %d, for %zd elements",
                     s.len, t.len, r, n);
        goto fail;
    }
    int got = get_planes(seq, views, n, 0);
    if (got != low_k) {
        if (got >= 0) {
            release_all(views, got);
            PyErr_SetString(PyExc_ValueError, "the planes changed while they were read");
        }
        goto fail;
    }
    const uint8_t *low[2] = {NULL, NULL};
    for (int j = 0; j < low_k; j++)
        low[j] = (const uint8_t *)views[j].buf;
    Py_BEGIN_ALLOW_THREADS
    if (k == 4 && WORDS_OK(out.buf, 4))
        join_exp4(low[0], low[1], (const uint8_t *)s.buf, (const uint8_t *)t.buf, r, (uint32_t *)out.buf, n);
    else if (k == 2 && WORDS_OK(out.buf, 2))
        join_exp2((const uint8_t *)s.buf, (const uint8_t *)t.buf, r, (uint16_t *)out.buf, n);
    else
        join_exp_any(low, (int)k, (const uint8_t *)s.buf, (const uint8_t *)t.buf, r, (uint8_t *)out.buf, n);
    Py_END_ALLOW_THREADS
    release_all(views, low_k);
    PyBuffer_Release(&s);
    PyBuffer_Release(&t);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&s);
    PyBuffer_Release(&t);
    PyBuffer_Release(&out);
    return NULL;
}

/* tall_f32's loop for elements [0, n) (mask bytes, or bits read as they are where AVX2 is); with
 * a BITS_BLOCK buffer unpacking bits elsewhere. */
static void tall_f32_range(const float *b, const float *m, const uint8_t *k, int bits, float *o, Py_ssize_t n) {
    if (!bits) {
        tall_f32_loop(b, m, k, o, n);
#ifdef HAVE_AVX2_PLANES
    } else if (__builtin_cpu_supports("avx2")) {
        tall_f32_bits_avx2(b, m, k, o, n);
#endif
    } else {
        uint8_t block[BITS_BLOCK];
        for (Py_ssize_t a = 0; a < n; a += BITS_BLOCK) {
            Py_ssize_t len = n - a < BITS_BLOCK ? n - a : BITS_BLOCK;
            unpack_loop(k + a / 8, block, len);
            tall_f32_loop(b + a, m + a, block, o + a, len);
        }
    }
}

static PyObject *tall_f32(PyObject *self, PyObject *args) {
    Py_buffer base, merged, mask, out;
    int bits = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*w*|p:tall_f32", &base, &merged, &mask, &out, &bits))
        return NULL;
    Py_ssize_t n = out.len / 4;
    int ok = out.len % 4 == 0 && base.len == out.len && merged.len == out.len && mask.len == MASK_BYTES(n, bits)
             && ((uintptr_t)base.buf & 3) == 0 && ((uintptr_t)merged.buf & 3) == 0 && ((uintptr_t)out.buf & 3) == 0;
    /* floats are native here: the caller passes tensors, not stored bytes */
    if (ok) {
        const float *b = (const float *)base.buf, *m = (const float *)merged.buf;
        const uint8_t *k = (const uint8_t *)mask.buf;
        float *o = (float *)out.buf;
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PLANES
        Py_ssize_t h, body;
        if (__builtin_cpu_supports("avx2") && stream_cut(o, 4, n, bits, &h, &body)) {
            tall_f32_range(b, m, k, bits, o, h);
            tall_f32_stream(b + h, m + h, MASK_FROM(k, h, bits), bits, o + h, body);
            h += body;
            tall_f32_range(b + h, m + h, MASK_FROM(k, h, bits), bits, o + h, n - h);
        } else
#endif
            tall_f32_range(b, m, k, bits, o, n);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "tall_f32: base %zd, merged %zd, mask %zd and out %zd bytes (or misaligned)",
                     base.len, merged.len, mask.len, out.len);
    }
    PyBuffer_Release(&base);
    PyBuffer_Release(&merged);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&out);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* Elements [a, a + len) of one of the rebuilds from planes (see tall_planes_call), ``mask`` theirs. */
static void tall_planes_range(int out_size, int f16, const uint8_t *const *b, int rb, const uint8_t *const *m, int rm,
                              const uint8_t *mask, int bits, void *out, Py_ssize_t a, Py_ssize_t len) {
    const uint8_t *bt[4], *mt[4];
    for (int j = 0; j < 4; j++) {
        bt[j] = b[j] != NULL ? b[j] + a : NULL;
        mt[j] = m[j] + a;
    }
    if (out_size == 4)
        tall_planes_any(bt, rb, mt, rm, mask, bits, (float *)out + a, len);
    else
        tall_planes_16_any(bt[0], bt[1], rb, mt, rm, mask, bits, (uint16_t *)out + a, len, f16);
}

/* Whether tall_planes_range's loop for this output reads a bit-packed mask itself (AVX2: eight lanes
 * test their bits); the others get the mask unpacked a block at a time. */
static int reads_bits(int out_size, int f16) {
#ifdef HAVE_AVX2_PLANES
    return __builtin_cpu_supports("avx2") && (out_size == 4 || __builtin_cpu_supports("f16c"));
#else
    (void)out_size;
    (void)f16;
    return 0;
#endif
}

/* tall_planes, tall_planes_bf16 and tall_planes_f16: the arguments checked alike (a mask of n bytes,
 * or with ``bits`` of ceil(n / 8)); out_size 4
 * (float32 base and output, four base planes) or 2 (bfloat16 or float16: two; ``f16`` says which). */
static PyObject *tall_planes_call(PyObject *args, int out_size, int f16, const char *format) {
    PyObject *bseq, *mseq;
    int rb, rm;
    const int base_planes = out_size;
    Py_buffer mask, out, bv[MAX_PLANES], mv[MAX_PLANES];
    int bits = 0;
    if (!PyArg_ParseTuple(args, format, &bseq, &rb, &mseq, &rm, &mask, &out, &bits))
        return NULL;
    Py_ssize_t n = out.len / out_size;
    int nb = -1, nm = -1;
    if (out.len % out_size || ((uintptr_t)out.buf & (out_size - 1)) || mask.len != MASK_BYTES(n, bits) || rb < 0 || rb > 7 || rm < 0
        || rm > 7) {
        PyErr_Format(PyExc_ValueError, "tall_planes: mask %zd and out %zd bytes (or misaligned), rotations %d and %d",
                     mask.len, out.len, rb, rm);
        goto done;
    }
    nb = get_planes(bseq, bv, n, base_planes);
    if (nb < 0)
        goto done;
    nm = get_planes(mseq, mv, n, 4);
    if (nm < 0)
        goto done;
    if (nb != base_planes || nm != 4) {
        PyErr_Format(PyExc_ValueError, "tall_planes: %d and %d planes, expected %d and 4", nb, nm, base_planes);
        goto done;
    }
    const uint8_t *b[4], *m[4];
    for (int j = 0; j < 4; j++) {
        b[j] = j < nb ? (const uint8_t *)bv[j].buf : NULL;
        m[j] = (const uint8_t *)mv[j].buf;
    }
    const uint8_t *k = (const uint8_t *)mask.buf;
    Py_BEGIN_ALLOW_THREADS
    if (!bits || reads_bits(out_size, f16)) {
        tall_planes_range(out_size, f16, b, rb, m, rm, k, bits, out.buf, 0, n);
    } else {
        uint8_t block[BITS_BLOCK];
        for (Py_ssize_t a = 0; a < n; a += BITS_BLOCK) {
            Py_ssize_t len = n - a < BITS_BLOCK ? n - a : BITS_BLOCK;
            unpack_loop(k + a / 8, block, len);
            tall_planes_range(out_size, f16, b, rb, m, rm, block, 0, out.buf, a, len);
        }
    }
    Py_END_ALLOW_THREADS
done:
    if (nb > 0)
        release_all(bv, nb);
    if (nm > 0)
        release_all(mv, nm);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&out);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *tall_planes(PyObject *self, PyObject *args) {
    return tall_planes_call(args, 4, 0, "OiOiy*w*|p:tall_planes");
}

static PyObject *tall_planes_bf16(PyObject *self, PyObject *args) {
    return tall_planes_call(args, 2, 0, "OiOiy*w*|p:tall_planes_bf16");
}

static PyObject *tall_planes_f16(PyObject *self, PyObject *args) {
    return tall_planes_call(args, 2, 1, "OiOiy*w*|p:tall_planes_f16");
}


/* The packer's TALL mask in one pass: mask[i] = |tau[i]| > lam * |merged[i] - tau[i]|, each step
 * rounded to float32 as torch's ops on float32 tensors round it (tall.tall_mask: the same bits),
 * and the sums Fidelity reports, of rec = mask * merged against tau: sum tau^2, rec^2, rec*tau and
 * (rec - tau)^2, in the one order spec 6.4 defines, so every build, CPU and thread count gets the
 * same bits (kernels.Sums is the numpy twin; tests compare them):
 *
 *   - a tensor's elements in blocks of MASK_BLOCK from its start (the last one may be shorter);
 *   - within a block, 8 float32 lanes: lane j adds the products of the elements i with i % 8 == j,
 *     in index order, from +0.0; each product rounded to float32 (no fused multiply-add: setup.py
 *     builds with -ffp-contract=off), each addition rounded;
 *   - a block's sum: its lanes added as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), float32;
 *   - across blocks (and tensors), exactly: each block's float32 sum is an integer multiple of
 *     2^-149, kept as its signed 24-bit significand in a bin per exponent (int64: no overflow before
 *     2^39 blocks), so the total does not depend on how the calls cut the tensors or in which order
 *     the tensors come; kernels.Sums rounds it once to float64. A block sum that is +-inf or NaN
 *     (never, within spec 6.3's bound) goes to a float64 sum of its own instead.
 *
 * The lanes are plain C arrays whose elements never mix, so any vector width the compiler picks
 * (AVX2's 8, SSE's 4, none) gives the same bits. A call covers elements [at, at + n) of a tensor:
 * at % MASK_BLOCK == 0 closes the block left open by the tensor before (a short last block); else
 * the call continues the open block, which must hold at % MASK_BLOCK elements (from lane at % 8). */
#define MASK_BLOCK 2048
#define LANES 8
#define SUMS 4
#define EXPONENTS 256
typedef struct {
    int64_t bins[SUMS][EXPONENTS];  /* exact sums of closed blocks' significands, by float32 exponent field */
    float lanes[SUMS][LANES];       /* the open block's lanes: tau^2, rec^2, rec*tau, (rec - tau)^2 */
    double special[SUMS];           /* the sum of closed blocks' infinite or NaN sums */
    int64_t fill;                   /* elements in the open block */
} fidelity_state;
/* kernels.Sums lays the state out so: */
typedef char fidelity_state_is_8360_bytes[sizeof(fidelity_state) == 8360 ? 1 : -1];

/* One element's mask bit and its products added to lane j. */
#define MASK_LANE(tau, merged, lam, mask, i, j, cnt, ts, rs, ds, es) do { \
        float t_ = (tau)[i], m_ = (merged)[i]; \
        int32_t k_ = fabsf(t_) > fabsf(m_ - t_) * (lam); \
        float r_ = m_ * (float)k_, e_ = r_ - t_; \
        (mask)[i] = (uint8_t)k_; \
        (cnt) += k_; \
        (ts)[j] += t_ * t_; \
        (rs)[j] += r_ * r_; \
        (ds)[j] += r_ * t_; \
        (es)[j] += e_ * e_; \
    } while (0)

/* The lanes' loop, W lanes to a vector (GCC's and clang's vector extensions: elementwise IEEE
 * float32 operations, whatever instructions carry them): W = 8 for AVX2, or two vectors of 4 (SSE2,
 * NEON). Written as vectors because GCC 12 vectorizes the same loop over arrays of lanes only two
 * lanes at a time, and lowers 8-lane comparisons to scalar ones without AVX. A mask byte is the low
 * byte of its lane's 0 or 1 (little-endian: the vectors are only used there). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HAVE_LANE_VECTORS 1
#if defined(__clang__)
#define LOW_BYTES(v, IB, ...) __builtin_shufflevector((v), (v), __VA_ARGS__)
#else
#define LOW_BYTES(v, IB, ...) __builtin_shuffle((v), (IB){__VA_ARGS__})
#endif
/* Elements [i, i + W) into the lanes (vt, vr, vd, ve: W floats each) and their mask bytes. */
#define LANES_STEP(F, I, IB, tau, merged, vlam, mask, i, vcnt, vt, vr, vd, ve, ...) do { \
        const I mag_ = (I){0} + 0x7FFFFFFF; \
        F t_, m_; \
        memcpy(&t_, (tau) + (i), sizeof t_); \
        memcpy(&m_, (merged) + (i), sizeof m_); \
        I k_ = -((F)((I)t_ & mag_) > (F)((I)(m_ - t_) & mag_) * (vlam)); /* 0 or 1 */ \
        F r_ = m_ * __builtin_convertvector(k_, F), e_ = r_ - t_; \
        IB b_ = LOW_BYTES((IB)k_, IB, __VA_ARGS__); \
        memcpy((mask) + (i), &b_, sizeof(F) / 4); \
        (vcnt) += k_; \
        (vt) += t_ * t_; \
        (vr) += r_ * r_; \
        (vd) += r_ * t_; \
        (ve) += e_ * e_; \
    } while (0)

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
#define BYTES4 0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0

/* Lanes 0-3 and 4-7 as two vectors; returns the set bits. Elements and lanes as taken element by
 * element (a vector's element j is lane j, or j + 4), so the bits of the scalar loop. */
static Py_ssize_t lanes_x4(const float *tau, const float *merged, float lam, uint8_t *mask, Py_ssize_t n,
                           float ts[LANES], float rs[LANES], float ds[LANES], float es[LANES], int64_t *cnt) {
    f32x4 t0, r0, d0, e0, t1, r1, d1, e1;
    for (int j = 0; j < 4; j++) {
        t0[j] = ts[j], r0[j] = rs[j], d0[j] = ds[j], e0[j] = es[j];
        t1[j] = ts[j + 4], r1[j] = rs[j + 4], d1[j] = ds[j + 4], e1[j] = es[j + 4];
    }
    const f32x4 vlam = (f32x4){0} + lam;
    i32x4 c0 = {0}, c1 = {0};
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        LANES_STEP(f32x4, i32x4, u8x16, tau, merged, vlam, mask, i, c0, t0, r0, d0, e0, BYTES4);
        LANES_STEP(f32x4, i32x4, u8x16, tau, merged, vlam, mask, i + 4, c1, t1, r1, d1, e1, BYTES4);
    }
    for (int j = 0; j < 4; j++) {
        *cnt += c0[j] + c1[j];
        ts[j] = t0[j], rs[j] = r0[j], ds[j] = d0[j], es[j] = e0[j];
        ts[j + 4] = t1[j], rs[j + 4] = r1[j], ds[j + 4] = d1[j], es[j + 4] = e1[j];
    }
    return i;
}

#ifdef HAVE_AVX2_PLANES
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));
#define BYTES8 0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0

/* lanes_x4 with the eight lanes in one AVX2 vector: the same bits. */
__attribute__((target("avx2"))) static Py_ssize_t lanes_x8(const float *tau, const float *merged, float lam,
                                                            uint8_t *mask, Py_ssize_t n, float ts[LANES],
                                                            float rs[LANES], float ds[LANES], float es[LANES],
                                                            int64_t *cnt) {
    f32x8 vt, vr, vd, ve;  /* element by element, not memcpy: a vector whose address is taken stays in memory */
    for (int j = 0; j < LANES; j++)
        vt[j] = ts[j], vr[j] = rs[j], vd[j] = ds[j], ve[j] = es[j];
    const f32x8 vlam = (f32x8){0} + lam;
    i32x8 c = {0};
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES)
        LANES_STEP(f32x8, i32x8, u8x32, tau, merged, vlam, mask, i, c, vt, vr, vd, ve, BYTES8);
    for (int j = 0; j < LANES; j++) {
        *cnt += c[j];
        ts[j] = vt[j], rs[j] = vr[j], ds[j] = vd[j], es[j] = ve[j];
    }
    return i;
}
#endif
#endif

/* mask and lanes of n <= MASK_BLOCK elements, the first in lane j0; returns the set bits. */
static int64_t mask_lanes(const float *tau, const float *merged, float lam, uint8_t *mask, Py_ssize_t n,
                          float lanes[SUMS][LANES], int avx2, int j0) {
    float ts[LANES], rs[LANES], ds[LANES], es[LANES];
    memcpy(ts, lanes[0], sizeof ts);
    memcpy(rs, lanes[1], sizeof rs);
    memcpy(ds, lanes[2], sizeof ds);
    memcpy(es, lanes[3], sizeof es);
    int64_t cnt = 0;
    Py_ssize_t i = 0;
    for (int j = j0; j0 && j < LANES && i < n; i++, j++)  /* a call that starts within a row of 8 */
        MASK_LANE(tau, merged, lam, mask, i, j, cnt, ts, rs, ds, es);
#ifdef HAVE_LANE_VECTORS
#ifdef HAVE_AVX2_PLANES
    if (avx2)
        i += lanes_x8(tau + i, merged + i, lam, mask + i, n - i, ts, rs, ds, es, &cnt);
    else
#endif
        i += lanes_x4(tau + i, merged + i, lam, mask + i, n - i, ts, rs, ds, es, &cnt);
#endif
    (void)avx2;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++)
            MASK_LANE(tau, merged, lam, mask, i + j, j, cnt, ts, rs, ds, es);
    for (int j = 0; i + j < n; j++)  /* a tensor's last elements */
        MASK_LANE(tau, merged, lam, mask, i + j, j, cnt, ts, rs, ds, es);
    memcpy(lanes[0], ts, sizeof ts);
    memcpy(lanes[1], rs, sizeof rs);
    memcpy(lanes[2], ds, sizeof ds);
    memcpy(lanes[3], es, sizeof es);
    return cnt;
}

/* Whether mask_lanes may take its AVX2 loop. */
static int lanes_avx2(void) {
#ifdef HAVE_AVX2_PLANES
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* The open block's sums into the bins, its lanes back to +0.0. */
static void close_block(fidelity_state *st) {
    for (int k = 0; k < SUMS; k++) {
        const float *l = st->lanes[k];
        float s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
        uint32_t u;
        memcpy(&u, &s, 4);
        uint32_t e = (u >> 23) & 0xFFu;
        if (e == 0xFFu) {
            st->special[k] += (double)s;
        } else {
            int64_t m = (int64_t)((u & 0x7FFFFFu) | (e ? 0x800000u : 0u));
            st->bins[k][e] += (u >> 31) ? -m : m;
        }
    }
    memset(st->lanes, 0, sizeof st->lanes);
    st->fill = 0;
}

/* Whether a call for elements [at, at + n) may go on from the state (with an exception set if not). */
static int state_ok(const char *who, fidelity_state *st, Py_ssize_t at) {
    if (at >= 0 && (at % MASK_BLOCK == 0 || st->fill == at % MASK_BLOCK)
        && st->fill >= 0 && st->fill < MASK_BLOCK)
        return 1;
    PyErr_Format(PyExc_ValueError, "%s: elements from %zd do not follow the %lld of the open block", who, at,
                 (long long)st->fill);
    return 0;
}

/* The elements [pos, pos + len) of the open block: len <= MASK_BLOCK - pos. */
#define NEXT_PIECE(st, n, i) ((n) - (i) < MASK_BLOCK - (st)->fill ? (n) - (i) : MASK_BLOCK - (st)->fill)

static int64_t tall_mask_loop(const float *tau, const float *merged, float lam, uint8_t *mask, Py_ssize_t n,
                              Py_ssize_t at, fidelity_state *st) {
    int64_t ones = 0;
    int avx2 = lanes_avx2();
    if (at % MASK_BLOCK == 0 && st->fill)
        close_block(st);
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t len = NEXT_PIECE(st, n, i);
        ones += mask_lanes(tau + i, merged + i, lam, mask + i, len, st->lanes, avx2, (int)(st->fill % LANES));
        i += len;
        st->fill += len;
        if (st->fill == MASK_BLOCK)
            close_block(st);
    }
    return ones;
}

/* A state buffer as the struct, or NULL with an exception set. */
static fidelity_state *state_of(const char *who, Py_buffer *b) {
    if (b->len == (Py_ssize_t)sizeof(fidelity_state) && WORDS_OK(b->buf, 8))
        return (fidelity_state *)b->buf;
    PyErr_Format(PyExc_ValueError, "%s: a fidelity state is %zd aligned bytes, got %zd", who,
                 (Py_ssize_t)sizeof(fidelity_state), b->len);
    return NULL;
}

static PyObject *tall_mask_f32(PyObject *self, PyObject *args) {
    Py_buffer tau, merged, mask, state;
    float lam;
    Py_ssize_t at;
    if (!PyArg_ParseTuple(args, "y*y*fw*w*n:tall_mask_f32", &tau, &merged, &lam, &mask, &state, &at))
        return NULL;
    Py_ssize_t n = mask.len;
    int ok = tau.len == 4 * n && merged.len == 4 * n && WORDS_OK(tau.buf, 4) && WORDS_OK(merged.buf, 4);
    if (!ok)
        PyErr_Format(PyExc_ValueError, "tall_mask_f32: %zd and %zd bytes of aligned float32 for %zd mask bytes",
                     tau.len, merged.len, n);
    fidelity_state *st = ok ? state_of("tall_mask_f32", &state) : NULL;
    ok = st != NULL && state_ok("tall_mask_f32", st, at);
    int64_t ones = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        ones = tall_mask_loop((const float *)tau.buf, (const float *)merged.buf, lam, (uint8_t *)mask.buf, n, at, st);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&tau);
    PyBuffer_Release(&merged);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&state);
    if (!ok)
        return NULL;
    return PyLong_FromLongLong((long long)ones);
}

/* -- the packer's task vectors and their sum --------------------------------------------------- */

/* Elements of a block: the base's widened block and a task's stay in L1. */
#define TV_BLOCK 1024
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2 };

HOT static void widen_bf16(const uint16_t *h, float *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)h[i] << 16;
        memcpy(&out[i], &u, 4);
    }
}

static void widen_f16_scalar(const uint16_t *h, float *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = f16_to_f32(h[i]);
}

#ifdef HAVE_AVX2_PLANES
__attribute__((target("avx2,f16c"))) static void widen_f16_f16c(const uint16_t *h, float *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    widen_f16_scalar(h + i, out + i, n - i);
}
#endif

/* A 16-bit block widened exactly into ``out`` (float16: F16C where the CPU has it). */
static void widen16(int kind, int f16c, const uint16_t *h, float *out, Py_ssize_t n) {
    if (kind == KIND_BF16)
        widen_bf16(h, out, n);
#ifdef HAVE_AVX2_PLANES
    else if (f16c)
        widen_f16_f16c(h, out, n);
#endif
    else
        widen_f16_scalar(h, out, n);
}

HOT static void sub_f32(const float *x, const float *b, float *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = x[i] - b[i];
}

HOT static void sub_add_f32(const float *x, const float *b, float *acc, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        acc[i] += x[i] - b[i];
}

HOT static void sub_plus_zero_f32(const float *x, const float *b, float *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (x[i] - b[i]) + 0.0f; /* -0.0 becomes +0.0, as TaskArithmetic's sum starts */
}

static int has_f16c(int kind) {
#ifdef HAVE_AVX2_PLANES
    return kind == KIND_F16 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    (void)kind;
    return 0;
#endif
}

/* Elements [a, a + len) of ``x`` (``kind``) as float32: the array itself for float32, else widened into ``buf``. */
static const float *widened(int kind, int f16c, const void *x, Py_ssize_t a, Py_ssize_t len, float *buf) {
    if (kind == KIND_F32)
        return (const float *)x + a;
    widen16(kind, f16c, (const uint16_t *)x + a, buf, len);
    return buf;
}

/* out = ((tau_0 + 0) + tau_1) + ... + tau_{T-1}, tau_t = widen(theta_t) - widen(theta_0), block by
 * block: TaskArithmetic.combine of tall.task_vector's task vectors, the same operations in the
 * same order, without writing the task vectors to memory. */
static void tv_sum_loop(int kind, const void *base, const void *const *thetas, Py_ssize_t T, float *out, Py_ssize_t n) {
    int f16c = has_f16c(kind);
    float bw[TV_BLOCK], xw[TV_BLOCK];
    for (Py_ssize_t a = 0; a < n; a += TV_BLOCK) {
        Py_ssize_t len = n - a < TV_BLOCK ? n - a : TV_BLOCK;
        const float *b32 = widened(kind, f16c, base, a, len, bw);
        for (Py_ssize_t t = 0; t < T; t++) {
            const float *x = widened(kind, f16c, thetas[t], a, len, xw);
            if (t == 0)
                sub_plus_zero_f32(x, b32, out + a, len);
            else
                sub_add_f32(x, b32, out + a, len);
        }
    }
}

/* tall_mask_loop with tau = widen(theta) - widen(theta_0) computed on the stack, a piece of the open
 * block at a time: the same mask bits and the same state. */
static int64_t tall_mask_tv_loop(int kind, const void *theta, const void *base, const float *merged, float lam,
                                 uint8_t *mask, Py_ssize_t n, Py_ssize_t at, fidelity_state *st) {
    int f16c = has_f16c(kind), avx2 = lanes_avx2();
    float bw[MASK_BLOCK], xw[MASK_BLOCK], tau[MASK_BLOCK];
    int64_t ones = 0;
    if (at % MASK_BLOCK == 0 && st->fill)
        close_block(st);
    for (Py_ssize_t a = 0; a < n;) {
        Py_ssize_t len = NEXT_PIECE(st, n, a);
        const float *b32 = widened(kind, f16c, base, a, len, bw);
        sub_f32(widened(kind, f16c, theta, a, len, xw), b32, tau, len);
        ones += mask_lanes(tau, merged + a, lam, mask + a, len, st->lanes, avx2, (int)(st->fill % LANES));
        a += len;
        st->fill += len;
        if (st->fill == MASK_BLOCK)
            close_block(st);
    }
    return ones;
}

/* ``count`` buffers from a sequence, each of ``len`` bytes and aligned to ``align``; *views gets a
 * PyMem array the caller releases with release_views. Returns count, or -1 with an exception set. */
static Py_ssize_t get_views(PyObject *seq, Py_buffer **views, Py_ssize_t len, int align) {
    PyObject *fast = PySequence_Fast(seq, "a sequence of buffers");
    if (fast == NULL)
        return -1;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast), j = 0;
    *views = PyMem_New(Py_buffer, k > 0 ? k : 1);
    if (*views == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (; j < k; j++) {
        Py_buffer *v = &(*views)[j];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, j), v, PyBUF_SIMPLE) < 0)
            break;
        if (v->len != len || !WORDS_OK(v->buf, align)) {
            PyErr_Format(PyExc_ValueError, "buffer %zd: %zd bytes (or misaligned), expected %zd", j, v->len, len);
            j++;
            break;
        }
    }
    Py_DECREF(fast);
    if (PyErr_Occurred()) {
        release_all(*views, (int)j);
        PyMem_Free(*views);
        *views = NULL;
        return -1;
    }
    return k;
}

static void release_views(Py_buffer *views, Py_ssize_t k) {
    if (views != NULL) {
        release_all(views, (int)k);
        PyMem_Free(views);
    }
}

static int kind_size(int kind) {
    return kind == KIND_F32 ? 4 : (kind == KIND_BF16 || kind == KIND_F16) ? 2 : 0;
}

/* The largest |x_i| of float32 values, as its bits (the sign cleared): over finite values the bits
 * order as the magnitudes do, and an infinity or a NaN has bits above every finite value's. */
HOT static uint32_t max_abs_f32(const float *x, Py_ssize_t n) {
    uint32_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v;
        memcpy(&v, &x[i], 4);
        v &= 0x7FFFFFFFu;
        m = v > m ? v : m;
    }
    return m;
}

/* The largest |widen(theta_i) - widen(base_i)| (float32, as tall.task_vector computes it) as its
 * bits: 0x7F800000 or more when a difference is infinite or NaN (an input holds one, or it overflows). */
static uint32_t max_abs_diff_loop(int kind, const void *theta, const void *base, Py_ssize_t n) {
    int f16c = has_f16c(kind);
    float bw[TV_BLOCK], xw[TV_BLOCK], d[TV_BLOCK];
    uint32_t m = 0;
    for (Py_ssize_t a = 0; a < n; a += TV_BLOCK) {
        Py_ssize_t len = n - a < TV_BLOCK ? n - a : TV_BLOCK;
        const float *b32 = widened(kind, f16c, base, a, len, bw);
        sub_f32(widened(kind, f16c, theta, a, len, xw), b32, d, len);
        uint32_t v = max_abs_f32(d, len);
        m = v > m ? v : m;
    }
    return m;
}

static PyObject *max_abs_diff(PyObject *self, PyObject *args) {
    Py_buffer theta, base;
    int kind;
    if (!PyArg_ParseTuple(args, "y*y*i:max_abs_diff", &theta, &base, &kind))
        return NULL;
    int size = kind_size(kind);
    int ok = size && theta.len == base.len && theta.len % size == 0 && WORDS_OK(theta.buf, size)
             && WORDS_OK(base.buf, size);
    uint32_t m = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        m = max_abs_diff_loop(kind, theta.buf, base.buf, theta.len / size);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "max_abs_diff: kind %d, %zd and %zd bytes (or misaligned)", kind, theta.len,
                     base.len);
    }
    PyBuffer_Release(&theta);
    PyBuffer_Release(&base);
    if (!ok)
        return NULL;
    return PyLong_FromUnsignedLong(m);
}


static PyObject *tv_sum(PyObject *self, PyObject *args) {
    Py_buffer base, out;
    PyObject *tseq;
    int kind;
    if (!PyArg_ParseTuple(args, "y*Oiw*:tv_sum", &base, &tseq, &kind, &out))
        return NULL;
    Py_buffer *tv = NULL;
    Py_ssize_t nt = -1;
    const void **th = NULL;
    int size = kind_size(kind);
    Py_ssize_t n = out.len / 4;
    if (!size || out.len % 4 || base.len != size * n || !WORDS_OK(base.buf, size) || !WORDS_OK(out.buf, 4)) {
        PyErr_Format(PyExc_ValueError, "tv_sum: kind %d, base %zd and out %zd bytes (or misaligned)", kind, base.len,
                     out.len);
        goto done;
    }
    nt = get_views(tseq, &tv, base.len, size);
    if (nt < 0)
        goto done;
    th = PyMem_New(const void *, nt > 0 ? nt : 1);
    if (nt < 1 || th == NULL) {
        if (th == NULL)
            PyErr_NoMemory();
        else
            PyErr_SetString(PyExc_ValueError, "tv_sum: no task");
        goto done;
    }
    for (Py_ssize_t t = 0; t < nt; t++)
        th[t] = tv[t].buf;
    Py_BEGIN_ALLOW_THREADS
    tv_sum_loop(kind, base.buf, th, nt, (float *)out.buf, n);
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(th);
    release_views(tv, nt);
    PyBuffer_Release(&base);
    PyBuffer_Release(&out);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *tall_mask_tv(PyObject *self, PyObject *args) {
    Py_buffer theta, base, merged, mask, state;
    int kind;
    float lam;
    Py_ssize_t at;
    if (!PyArg_ParseTuple(args, "y*y*iy*fw*w*n:tall_mask_tv", &theta, &base, &kind, &merged, &lam, &mask, &state, &at))
        return NULL;
    Py_ssize_t n = mask.len;
    int size = kind_size(kind);
    int ok = size && theta.len == size * n && base.len == size * n && merged.len == 4 * n
             && WORDS_OK(theta.buf, size) && WORDS_OK(base.buf, size) && WORDS_OK(merged.buf, 4);
    if (!ok)
        PyErr_Format(PyExc_ValueError, "tall_mask_tv: kind %d, theta %zd, base %zd, merged %zd bytes (or misaligned) "
                     "for %zd mask bytes", kind, theta.len, base.len, merged.len, n);
    fidelity_state *st = ok ? state_of("tall_mask_tv", &state) : NULL;
    ok = st != NULL && state_ok("tall_mask_tv", st, at);
    int64_t ones = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        ones = tall_mask_tv_loop(kind, theta.buf, base.buf, (const float *)merged.buf, lam, (uint8_t *)mask.buf, n,
                                 at, st);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&theta);
    PyBuffer_Release(&base);
    PyBuffer_Release(&merged);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&state);
    if (!ok)
        return NULL;
    return PyLong_FromLongLong((long long)ones);
}

/* -- TIES (merging.Ties): the threshold's histograms, the elected signs, the disjoint sum --------- */

/* Elements [a, a + len) of task vector t: widen(theta) - b32, or, without a base (b32 NULL), the
 * float32 thetas themselves. */
static const float *tv_block(int kind, int f16c, const void *theta, const float *b32, Py_ssize_t a, Py_ssize_t len,
                             float *xw, float *tau) {
    const float *x = widened(kind, f16c, theta, a, len, xw);
    if (b32 == NULL)
        return x;
    sub_f32(x, b32, tau, len);
    return tau;
}

/* (n <= TV_BLOCK.) The zeros (most of a sparse fine-tune's task vector) are counted apart: one bin
 * incremented element after element waits on its own last store each time (7 ns an element here). */
HOT static void hist_high(const float *x, Py_ssize_t n, int64_t *hist) {
    uint16_t high[TV_BLOCK];
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v;
        memcpy(&v, &x[i], 4);
        v &= 0x7FFFFFFFu;
        high[k] = (uint16_t)(v >> 16);
        k += v != 0;
    }
    hist[0] += n - k;
    for (Py_ssize_t i = 0; i < k; i++)
        hist[high[i]]++;
}

/* Few elements fall in bin b: runs of 16 with none are told in one vector test. */
HOT static void hist_low(const float *x, Py_ssize_t n, uint32_t b, int64_t *hist) {
    for (Py_ssize_t a = 0; a < n; a += 16) {
        Py_ssize_t e = a + 16 < n ? a + 16 : n;
        int any = 0;
        for (Py_ssize_t i = a; i < e; i++) {
            uint32_t v;
            memcpy(&v, &x[i], 4);
            any |= ((v & 0x7FFFFFFFu) >> 16) == b;
        }
        for (Py_ssize_t i = a; any && i < e; i++) {
            uint32_t v;
            memcpy(&v, &x[i], 4);
            v &= 0x7FFFFFFFu;
            if (v >> 16 == b)
                hist[v & 0xFFFFu]++;
        }
    }
}

static void ties_hist_loop(int kind, const void *theta, const void *base, Py_ssize_t n, long b, int64_t *hist) {
    int f16c = has_f16c(kind);
    float bw[TV_BLOCK], xw[TV_BLOCK], tau[TV_BLOCK];
    for (Py_ssize_t a = 0; a < n; a += TV_BLOCK) {
        Py_ssize_t len = n - a < TV_BLOCK ? n - a : TV_BLOCK;
        const float *b32 = base ? widened(kind, f16c, base, a, len, bw) : NULL;
        const float *x = tv_block(kind, f16c, theta, b32, a, len, xw, tau);
        if (b < 0)
            hist_high(x, len, hist);
        else
            hist_low(x, len, (uint32_t)b, hist);
    }
}

/* s += r, r = x where |x| >= thr, else +0.0 (a trimmed -0.0 or +0.0 changes no sum that starts at +0.0
 * but the sign of a zero, which sign() does not see). */
HOT static void trim_add(const float *x, float thr, float *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        s[i] += fabsf(x[i]) >= thr ? x[i] : 0.0f;
}

/* m += k, c += [k != 0], k = x where |x| >= thr and x has the elected sign (that of s, or of s0 where
 * s is 0; where both are 0, the negative x). A kept x is never 0, so m, from +0.0, never becomes -0.0. */
HOT static void select_add(const float *x, float thr, const float *s, float s0, float *m, uint8_t *c, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = x[i], e = s[i] != 0.0f ? s[i] : s0;
        int keep = fabsf(v) >= thr && (e > 0.0f ? v > 0.0f : v < 0.0f);
        m[i] += keep ? v : 0.0f;
        c[i] += (uint8_t)keep;
    }
}

/* S of elements [a, a + len) into s. */
static void trimmed_sum_block(int kind, int f16c, const void *base, const void *const *thetas, Py_ssize_t T,
                              const float *thr, Py_ssize_t a, Py_ssize_t len, float *bw, float *xw, float *tau,
                              float *s) {
    const float *b32 = base ? widened(kind, f16c, base, a, len, bw) : NULL;
    for (Py_ssize_t i = 0; i < len; i++)
        s[i] = 0.0f;
    for (Py_ssize_t t = 0; t < T; t++)
        trim_add(tv_block(kind, f16c, thetas[t], b32, a, len, xw, tau), thr[t], s, len);
}

static void ties_signs_loop(int kind, const void *base, const void *const *thetas, Py_ssize_t T, const float *thr,
                            Py_ssize_t n, int64_t *pos, int64_t *neg) {
    int f16c = has_f16c(kind);
    float bw[TV_BLOCK], xw[TV_BLOCK], tau[TV_BLOCK], s[TV_BLOCK];
    int64_t p = 0, q = 0;
    for (Py_ssize_t a = 0; a < n; a += TV_BLOCK) {
        Py_ssize_t len = n - a < TV_BLOCK ? n - a : TV_BLOCK;
        trimmed_sum_block(kind, f16c, base, thetas, T, thr, a, len, bw, xw, tau, s);
        int32_t bp = 0, bq = 0;
        for (Py_ssize_t i = 0; i < len; i++) {
            bp += s[i] > 0.0f;
            bq += s[i] < 0.0f;
        }
        p += bp;
        q += bq;
    }
    *pos = p;
    *neg = q;
}

static void ties_merge_loop(int kind, const void *base, const void *const *thetas, Py_ssize_t T, const float *thr,
                            float s0, float *out, uint8_t *counts, Py_ssize_t n) {
    int f16c = has_f16c(kind);
    float bw[TV_BLOCK], xw[TV_BLOCK], tau[TV_BLOCK], s[TV_BLOCK];
    for (Py_ssize_t a = 0; a < n; a += TV_BLOCK) {
        Py_ssize_t len = n - a < TV_BLOCK ? n - a : TV_BLOCK;
        trimmed_sum_block(kind, f16c, base, thetas, T, thr, a, len, bw, xw, tau, s);
        const float *b32 = base ? widened(kind, f16c, base, a, len, bw) : NULL;
        float *m = out + a;
        uint8_t *c = counts + a;
        for (Py_ssize_t i = 0; i < len; i++) {
            m[i] = 0.0f;
            c[i] = 0;
        }
        for (Py_ssize_t t = 0; t < T; t++)
            select_add(tv_block(kind, f16c, thetas[t], b32, a, len, xw, tau), thr[t], s, s0, m, c, len);
    }
}

/* The base (an empty buffer: none) and the thetas of a TIES call: n elements of ``kind`` each, the
 * thetas' buffers in *views and their pointers in *th (PyMem arrays; ties_release frees them), and
 * ``thr``'s float32 thresholds one per theta. Returns the number of thetas, or -1 with an exception set. */
static Py_ssize_t ties_inputs(const char *fn, Py_buffer *base, PyObject *tseq, int kind, Py_ssize_t n,
                              Py_buffer *thr, Py_buffer **views, const void ***th) {
    int size = kind_size(kind);
    *views = NULL;
    *th = NULL;
    if (!size || n > PY_SSIZE_T_MAX / size  /* size * n below must not wrap */
        || (base->len != 0 && (base->len != size * n || !WORDS_OK(base->buf, size)))
        || (base->len == 0 && kind != KIND_F32) || !WORDS_OK(thr->buf, 4)) {
        PyErr_Format(PyExc_ValueError, "%s: kind %d, base %zd bytes for %zd elements (or misaligned)", fn, kind,
                     base->len, n);
        return -1;
    }
    Py_ssize_t nt = get_views(tseq, views, size * n, size);
    if (nt < 0)
        return -1;
    if (nt < 1 || nt > 255 || thr->len != 4 * nt) {  /* counts are uint8 (spec 6.2: at most 255 tasks) */
        PyErr_Format(PyExc_ValueError, "%s: %zd tasks and %zd bytes of thresholds", fn, nt, thr->len);
        return nt;
    }
    *th = PyMem_New(const void *, nt);
    if (*th == NULL) {
        PyErr_NoMemory();
        return nt;
    }
    for (Py_ssize_t t = 0; t < nt; t++)
        (*th)[t] = (*views)[t].buf;
    return nt;
}

static PyObject *ties_hist(PyObject *self, PyObject *args) {
    Py_buffer theta, base, hist;
    int kind;
    long b;
    if (!PyArg_ParseTuple(args, "y*y*ilw*:ties_hist", &theta, &base, &kind, &b, &hist))
        return NULL;
    int size = kind_size(kind);
    Py_ssize_t n = size ? theta.len / size : 0;
    int ok = size && theta.len % size == 0 && WORDS_OK(theta.buf, size) && b < 65536
             && hist.len == 65536 * 8 && WORDS_OK(hist.buf, 8)
             && (base.len == 0 ? kind == KIND_F32 : base.len == theta.len && WORDS_OK(base.buf, size));
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        ties_hist_loop(kind, theta.buf, base.len ? base.buf : NULL, n, b, (int64_t *)hist.buf);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "ties_hist: kind %d, theta %zd, base %zd, hist %zd bytes, bin %ld "
                     "(or misaligned)", kind, theta.len, base.len, hist.len, b);
    }
    PyBuffer_Release(&theta);
    PyBuffer_Release(&base);
    PyBuffer_Release(&hist);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *ties_signs(PyObject *self, PyObject *args) {
    Py_buffer base, thr;
    PyObject *tseq;
    int kind;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*Oiy*n:ties_signs", &base, &tseq, &kind, &thr, &n))
        return NULL;
    Py_buffer *tv = NULL;
    const void **th = NULL;
    int64_t pos = 0, neg = 0;
    Py_ssize_t nt = n >= 0 ? ties_inputs("ties_signs", &base, tseq, kind, n, &thr, &tv, &th) : -1;
    if (n < 0)
        PyErr_SetString(PyExc_ValueError, "ties_signs: a negative length");
    if (!PyErr_Occurred()) {
        Py_BEGIN_ALLOW_THREADS
        ties_signs_loop(kind, base.len ? base.buf : NULL, th, nt, (const float *)thr.buf, n, &pos, &neg);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(th);
    release_views(tv, nt);
    PyBuffer_Release(&base);
    PyBuffer_Release(&thr);
    if (PyErr_Occurred())
        return NULL;
    return Py_BuildValue("LL", (long long)pos, (long long)neg);
}

static PyObject *ties_merge(PyObject *self, PyObject *args) {
    Py_buffer base, thr, out, counts;
    PyObject *tseq;
    int kind;
    float s0;
    if (!PyArg_ParseTuple(args, "y*Oiy*fw*w*:ties_merge", &base, &tseq, &kind, &thr, &s0, &out, &counts))
        return NULL;
    Py_buffer *tv = NULL;
    const void **th = NULL;
    Py_ssize_t n = counts.len, nt = -1;
    if (out.len != 4 * n || !WORDS_OK(out.buf, 4))
        PyErr_Format(PyExc_ValueError, "ties_merge: out %zd bytes for %zd counts (or misaligned)", out.len, n);
    else
        nt = ties_inputs("ties_merge", &base, tseq, kind, n, &thr, &tv, &th);
    if (!PyErr_Occurred()) {
        Py_BEGIN_ALLOW_THREADS
        ties_merge_loop(kind, base.len ? base.buf : NULL, th, nt, (const float *)thr.buf, s0, (float *)out.buf,
                        (uint8_t *)counts.buf, n);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(th);
    release_views(tv, nt);
    PyBuffer_Release(&base);
    PyBuffer_Release(&thr);
    PyBuffer_Release(&out);
    PyBuffer_Release(&counts);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* -- merged models (merging.apply_direction, merged.MergeParts): one pass a tensor ------------------
 *
 * out = narrow(widen(theta) + alpha * d) with, first, d = d * (count >= k ? 1 : 0), count the number of
 * 0/1 mask bytes set among the masks (Consensus Merging's m_cons * tau_MTL), and d = d / max(counts, 1)
 * (TIES' disjoint mean): the same float32 operations in the same order as the torch expressions, so
 * the same bits. ``kind`` is theta's and out's: 0 float32, 1 bfloat16, 2 float16 (their bits), 3
 * float64 (rounded to float32 first, as Tensor.to(torch.float32), the sum widened back exactly). */
enum { KIND_F64 = 3 };
#define MERGE_BLOCK 1024
/* the flags merge_apply returns */
#define OUT_NOT_FINITE 1
#define IN_NOT_FINITE 2

/* d's block: the masks' consensus and the counts' division applied (torch's tau * m_cons, with the
 * mask promoted to 0.0/1.0, and tau / clamp(counts.float(), min=1)). */
HOT static void direction_block(const float *d, const uint8_t *const *masks, Py_ssize_t nm, long k,
                                const uint8_t *counts, Py_ssize_t a, Py_ssize_t len, float *out) {
    uint16_t c[MERGE_BLOCK];
    for (Py_ssize_t i = 0; i < len; i++)
        out[i] = d[a + i];
    if (nm) {
        for (Py_ssize_t i = 0; i < len; i++)
            c[i] = 0;
        for (Py_ssize_t t = 0; t < nm; t++) {
            const uint8_t *m = masks[t] + a;
            for (Py_ssize_t i = 0; i < len; i++)
                c[i] = (uint16_t)(c[i] + m[i]);
        }
        /* 1.0f's bits where the count reaches k, else 0.0f's: no branch, so the loop vectorizes */
        uint32_t kk = k <= 0 ? 0u : k > 65535 ? 65536u : (uint32_t)k;
        for (Py_ssize_t i = 0; i < len; i++) {
            uint32_t one = 0x3F800000u & (0u - (uint32_t)((uint32_t)c[i] >= kk));
            float f;
            memcpy(&f, &one, 4);
            out[i] = out[i] * f;
        }
    }
    if (counts) {
        const uint8_t *q = counts + a;
        for (Py_ssize_t i = 0; i < len; i++) {
            int32_t c1 = (int32_t)q[i] + (q[i] == 0); /* max(counts, 1), exact in float32 */
            out[i] = out[i] / (float)c1;
        }
    }
}

static inline uint32_t f32_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

/* float32 theta and out; returns the flags of the block. */
HOT static int apply_f32(const float *th, const float *d, float alpha, float *out, Py_ssize_t n) {
    uint32_t bad_out = 0, bad_in = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float t = th[i], v = d[i]; /* read before out is written: out may be theta or d */
        float o = t + alpha * v;
        out[i] = o;
        bad_out |= (f32_bits(o) & 0x7F800000u) == 0x7F800000u;
        bad_in |= ((f32_bits(t) & 0x7F800000u) == 0x7F800000u) | ((f32_bits(v) & 0x7F800000u) == 0x7F800000u);
    }
    return (bad_out ? OUT_NOT_FINITE : 0) | (bad_in ? IN_NOT_FINITE : 0);
}

/* bfloat16 theta (its bits) and out, rounded to nearest even (bf16_rne). */
HOT static int apply_bf16(const uint16_t *th, const float *d, float alpha, uint16_t *out, Py_ssize_t n) {
    uint32_t bad_out = 0, bad_in = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t b = th[i]; /* read before out is written: out may be theta */
        uint32_t u = (uint32_t)b << 16;
        float t, v = d[i];
        memcpy(&t, &u, 4);
        uint16_t h = bf16_rne(t + alpha * v);
        out[i] = h;
        bad_out |= (h & 0x7F80u) == 0x7F80u;
        bad_in |= ((b & 0x7F80u) == 0x7F80u) | ((f32_bits(v) & 0x7F800000u) == 0x7F800000u);
    }
    return (bad_out ? OUT_NOT_FINITE : 0) | (bad_in ? IN_NOT_FINITE : 0);
}

#ifdef HAVE_AVX2_PLANES
/* float32 to float16 eight at a time with F16C, rounding to nearest even as torch's own conversion
 * does, a NaN's payload too (the last few through a padded block); returns n. */
__attribute__((target("avx2,f16c"))) static Py_ssize_t narrow_f16_f16c(const float *v, uint16_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) {
        float pad[8] = {0};
        uint16_t got[8];
        memcpy(pad, v + i, (size_t)(n - i) * 4);
        _mm_storeu_si128((__m128i *)got, _mm256_cvtps_ph(_mm256_loadu_ps(pad), _MM_FROUND_TO_NEAREST_INT));
        memcpy(out + i, got, (size_t)(n - i) * 2);
    }
    return n;
}
#endif

/* float16 theta (its bits, widened into ``tw``) and out. */
static int apply_f16(int f16c, const uint16_t *th, const float *d, float alpha, uint16_t *out, Py_ssize_t n,
                     float *tw) {
    uint32_t bad_out = 0, bad_in = 0;
    widen16(KIND_F16, f16c, th, tw, n);
    for (Py_ssize_t i = 0; i < n; i++) { /* theta read before out is written: out may be theta */
        tw[i] = tw[i] + alpha * d[i];
        bad_in |= ((th[i] & 0x7C00u) == 0x7C00u) | ((f32_bits(d[i]) & 0x7F800000u) == 0x7F800000u);
    }
    Py_ssize_t i = 0;
#ifdef HAVE_AVX2_PLANES
    if (f16c)
        i = narrow_f16_f16c(tw, out, n);
#endif
    for (; i < n; i++)
        out[i] = f16_rne(tw[i]);
    for (i = 0; i < n; i++)
        bad_out |= (out[i] & 0x7C00u) == 0x7C00u;
    return (bad_out ? OUT_NOT_FINITE : 0) | (bad_in ? IN_NOT_FINITE : 0);
}

/* float64 theta and out: theta rounded to float32, the float32 sum widened back. */
HOT static int apply_f64(const double *th, const float *d, float alpha, double *out, Py_ssize_t n) {
    uint32_t bad_out = 0, bad_in = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double t = th[i]; /* read before out is written: out may be theta */
        float v = d[i];
        float o = (float)t + alpha * v;
        out[i] = (double)o;
        uint64_t u;
        memcpy(&u, &t, 8);
        bad_out |= (f32_bits(o) & 0x7F800000u) == 0x7F800000u;
        bad_in |= ((u & 0x7FF0000000000000ull) == 0x7FF0000000000000ull)
                  | ((f32_bits(v) & 0x7F800000u) == 0x7F800000u);
    }
    return (bad_out ? OUT_NOT_FINITE : 0) | (bad_in ? IN_NOT_FINITE : 0);
}

static int merge_apply_loop(int kind, const void *theta, const float *d, const uint8_t *const *masks, Py_ssize_t nm,
                            long k, const uint8_t *counts, float alpha, void *out, Py_ssize_t n) {
    int f16c = has_f16c(kind), flags = 0;
    float dw[MERGE_BLOCK], tw[MERGE_BLOCK];
    for (Py_ssize_t a = 0; a < n; a += MERGE_BLOCK) {
        Py_ssize_t len = n - a < MERGE_BLOCK ? n - a : MERGE_BLOCK;
        const float *db = d + a;
        if (nm || counts) {
            direction_block(d, masks, nm, k, counts, a, len, dw);
            db = dw;
        }
        if (kind == KIND_F32)
            flags |= apply_f32((const float *)theta + a, db, alpha, (float *)out + a, len);
        else if (kind == KIND_BF16)
            flags |= apply_bf16((const uint16_t *)theta + a, db, alpha, (uint16_t *)out + a, len);
        else if (kind == KIND_F16)
            flags |= apply_f16(f16c, (const uint16_t *)theta + a, db, alpha, (uint16_t *)out + a, len, tw);
        else
            flags |= apply_f64((const double *)theta + a, db, alpha, (double *)out + a, len);
    }
    return flags;
}

static PyObject *merge_apply(PyObject *self, PyObject *args) {
    Py_buffer theta, d, counts, out;
    PyObject *mseq;
    int kind;
    long k;
    float alpha;
    if (!PyArg_ParseTuple(args, "y*iy*Oly*fw*:merge_apply", &theta, &kind, &d, &mseq, &k, &counts, &alpha, &out))
        return NULL;
    Py_buffer *mv = NULL;
    const uint8_t **mp = NULL;
    Py_ssize_t nm = -1, n = d.len / 4;
    int size = kind == KIND_F64 ? 8 : kind_size(kind), flags = 0;
    if (!size || d.len % 4 || !WORDS_OK(d.buf, 4) || n > PY_SSIZE_T_MAX / 8 || theta.len != size * n
        || out.len != size * n || !WORDS_OK(theta.buf, size) || !WORDS_OK(out.buf, size)
        || (counts.len != 0 && counts.len != n)) {
        PyErr_Format(PyExc_ValueError, "merge_apply: kind %d, theta %zd, d %zd, counts %zd and out %zd bytes "
                     "(or misaligned)", kind, theta.len, d.len, counts.len, out.len);
        goto done;
    }
    nm = get_views(mseq, &mv, n, 1);
    if (nm < 0)
        goto done;
    mp = PyMem_New(const uint8_t *, nm > 0 ? nm : 1);
    if (mp == NULL || nm > 65535) {
        if (mp == NULL)
            PyErr_NoMemory();
        else
            PyErr_Format(PyExc_ValueError, "merge_apply: %zd masks (at most 65535)", nm);
        goto done;
    }
    for (Py_ssize_t t = 0; t < nm; t++)
        mp[t] = (const uint8_t *)mv[t].buf;
    Py_BEGIN_ALLOW_THREADS
    flags = merge_apply_loop(kind, theta.buf, (const float *)d.buf, mp, nm, k,
                             counts.len ? (const uint8_t *)counts.buf : NULL, alpha, out.buf, n);
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(mp);
    release_views(mv, nm);
    PyBuffer_Release(&theta);
    PyBuffer_Release(&d);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&out);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(flags);
}

static PyObject *unpack_bits(PyObject *self, PyObject *args) {
    Py_buffer packed, out;
    if (!PyArg_ParseTuple(args, "y*w*:unpack_bits", &packed, &out))
        return NULL;
    int ok = packed.len == (out.len + 7) / 8;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        unpack_loop((const uint8_t *)packed.buf, (uint8_t *)out.buf, out.len);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "unpack_bits: %zd bytes of bits for %zd elements", packed.len, out.len);
    }
    PyBuffer_Release(&packed);
    PyBuffer_Release(&out);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* -- bitsplit (codecs.BitSplit.encode) ------------------------------------------------------------ */

#if defined(__GNUC__) || defined(__clang__)
#define BIT_LENGTH(v) ((v) ? 32 - __builtin_clz(v) : 0)
#else
static inline int bit_length_any(uint32_t v) {
    int n = 0;
    while (v) {
        n++;
        v >>= 1;
    }
    return n;
}
#define BIT_LENGTH(v) bit_length_any(v)
#endif

/* Element v of bit length L: head 4 * L + t, t the two bits below its leading one (v - 2**(L-1)
 * when L is 1 or 2), then its max(L - 3, 0) low bits appended to the stream (at most 29, so an
 * accumulator below 32 bits plus them fits 64). Elements are read byte by byte (little-endian,
 * any alignment). Returns the stream's length in bytes; the last byte's unused bits are zero. */
static Py_ssize_t bitsplit_loop(const uint8_t *src, int k, Py_ssize_t n, uint8_t *heads, uint8_t *low) {
    uint64_t acc = 0;
    int fill = 0;
    uint8_t *o = low;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *p = src + i * k;
        uint32_t v = k == 4 ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24
                   : k == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : p[0];
        int len = BIT_LENGTH(v);
        int width = len > 3 ? len - 3 : 0;
        uint32_t lead = len >= 3 ? 4u : (uint32_t)len;  /* min(2**(L-1), 4); 0 for v = 0 */
        heads[i] = (uint8_t)(4 * len + ((v >> width) - lead));
        acc |= (uint64_t)(v & ((1u << width) - 1u)) << fill;
        fill += width;
        if (fill >= 32) {
            o[0] = (uint8_t)acc; o[1] = (uint8_t)(acc >> 8); o[2] = (uint8_t)(acc >> 16); o[3] = (uint8_t)(acc >> 24);
            o += 4;
            acc >>= 32;
            fill -= 32;
        }
    }
    for (; fill > 0; fill -= 8) {
        *o++ = (uint8_t)acc;
        acc >>= 8;
    }
    return o - low;
}

static PyObject *bitsplit(PyObject *self, PyObject *args) {
    Py_buffer src, heads, low;
    int k;
    if (!PyArg_ParseTuple(args, "y*iw*w*:bitsplit", &src, &k, &heads, &low))
        return NULL;
    Py_ssize_t n = (k == 1 || k == 2 || k == 4) ? src.len / k : -1;
    /* the stream's bound: 8k - 3 bits an element, plus the last word's spare bytes */
    int ok = n >= 0 && src.len % k == 0 && heads.len == n && n <= PY_SSIZE_T_MAX / 32
             && low.len >= (n * (8 * k - 3) + 7) / 8;
    Py_ssize_t got = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        got = bitsplit_loop((const uint8_t *)src.buf, k, n, (uint8_t *)heads.buf, (uint8_t *)low.buf);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "bitsplit: %zd bytes of %d-byte elements, %zd head bytes, %zd for the low bits",
                     src.len, k, heads.len, low.len);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&heads);
    PyBuffer_Release(&low);
    if (!ok)
        return NULL;
    return PyLong_FromSsize_t(got);
}

/* -- bitsplit (codecs.BitSplit.decode_into) ------------------------------------------------------ */

/* The inverse of bitsplit_loop: each head byte 4 * L + t names an element of bit length L whose
 * leading bits are min(2**(L-1), 4) + t and whose max(L - 3, 0) low bits come next in the stream.
 * A first pass checks every head against k-byte elements and sums the widths (the stream must be
 * exactly that long, its last byte's unused bits zero), so the second never reads past it.
 * Returns 0, or -1 (a head names no k-byte element), -2 (the stream's length), -3 (padding). */
static int bitjoin_loop(const uint8_t *heads, Py_ssize_t n, const uint8_t *low, Py_ssize_t nlow, int k,
                        uint8_t *out) {
    static const uint8_t t_limit[4] = {1, 1, 2, 4};
    uint8_t width[256], valid[256];
    uint32_t lead[256];
    for (int h = 0; h < 256; h++) {
        int len = h >> 2, t = h & 3;
        valid[h] = len <= 8 * k && t < t_limit[len < 3 ? len : 3];
        width[h] = (uint8_t)(len > 3 ? len - 3 : 0);
        lead[h] = (len >= 3 ? 4u : (uint32_t)(1u << len >> 1)) + (uint32_t)t;
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!valid[heads[i]])
            return -1;
        total += width[heads[i]];
    }
    if ((uint64_t)nlow != (total + 7) / 8)
        return -2;
    if (total % 8 && (low[nlow - 1] >> (total % 8)))
        return -3;
    uint64_t acc = 0;
    int fill = 0;
    const uint8_t *p = low;
    for (Py_ssize_t i = 0; i < n; i++) {
        int w = width[heads[i]];
        while (fill < w) { /* at most 29 bits wanted: acc never passes 36 */
            acc |= (uint64_t)*p++ << fill;
            fill += 8;
        }
        uint32_t v = lead[heads[i]] << w | (uint32_t)(acc & ((1u << w) - 1u));
        acc >>= w;
        fill -= w;
        uint8_t *o = out + i * k;
        o[0] = (uint8_t)v;
        if (k > 1) o[1] = (uint8_t)(v >> 8);
        if (k > 2) { o[2] = (uint8_t)(v >> 16); o[3] = (uint8_t)(v >> 24); }
    }
    return 0;
}

static PyObject *bitjoin(PyObject *self, PyObject *args) {
    Py_buffer heads, low, out;
    int k;
    if (!PyArg_ParseTuple(args, "y*y*iw*:bitjoin", &heads, &low, &k, &out))
        return NULL;
    int ok = (k == 1 || k == 2 || k == 4) && out.len == heads.len * k;
    int status = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        status = bitjoin_loop((const uint8_t *)heads.buf, heads.len, (const uint8_t *)low.buf, low.len, k,
                              (uint8_t *)out.buf);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "bitjoin: %zd head bytes, %zd output bytes of %d-byte elements",
                     heads.len, out.len, k);
    }
    PyBuffer_Release(&heads);
    PyBuffer_Release(&low);
    PyBuffer_Release(&out);
    if (!ok)
        return NULL;
    return PyLong_FromLong(status);
}

/* -- the exact tier's exponent order (encodings/exact.py: permute) ------------------------------- */

#define KEY_BITS_MAX 11

static inline uint64_t load_le(const uint8_t *p, int k) {
    uint64_t v = 0;
    for (int j = k - 1; j >= 0; j--)
        v = v << 8 | p[j];
    return v;
}

/* out = src's elements in the stable order of their keys: a count of each key, then each element
 * copied to the next place of its key's run. */
ALWAYS_INLINE void permute_key_body(const uint8_t *src, const uint8_t *key, int k, int shift, int bits, uint8_t *out,
                             Py_ssize_t n, int gather) {
    Py_ssize_t place[1 << KEY_BITS_MAX];
    const uint64_t mask = ((uint64_t)1 << bits) - 1;
    memset(place, 0, sizeof(Py_ssize_t) << bits);
    for (Py_ssize_t i = 0; i < n; i++)
        place[(load_le(key + i * k, k) >> shift) & mask]++;
    Py_ssize_t sum = 0;
    for (Py_ssize_t b = 0; b < ((Py_ssize_t)1 << bits); b++) {
        Py_ssize_t c = place[b];
        place[b] = sum;
        sum += c;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t to = place[(load_le(key + i * k, k) >> shift) & mask]++;
        if (gather) /* the inverse: element i of the output is the one permute put at ``to`` */
            memcpy(out + i * k, src + to * k, k);
        else
            memcpy(out + to * k, src + i * k, k);
    }
}

/* The body with k a constant, so each loop's loads and copies are single moves. */
static void permute_key_loop(const uint8_t *src, const uint8_t *key, int k, int shift, int bits, uint8_t *out,
                             Py_ssize_t n, int gather) {
    switch (k) {
    case 1: permute_key_body(src, key, 1, shift, bits, out, n, gather); break;
    case 2: permute_key_body(src, key, 2, shift, bits, out, n, gather); break;
    case 4: permute_key_body(src, key, 4, shift, bits, out, n, gather); break;
    default: permute_key_body(src, key, 8, shift, bits, out, n, gather); break;
    }
}

static PyObject *permute_key_any(PyObject *args, int gather) {
    Py_buffer src, key, out;
    int k, shift, bits;
    if (!PyArg_ParseTuple(args, gather ? "y*y*iiiw*:unpermute_key" : "y*y*iiiw*:permute_key", &src, &key, &k, &shift, &bits, &out))
        return NULL;
    int ok = (k == 1 || k == 2 || k == 4 || k == 8) && src.len % k == 0 && key.len == src.len && out.len == src.len
             && bits >= 1 && bits <= KEY_BITS_MAX && shift >= 0 && shift + bits <= 8 * k;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        permute_key_loop((const uint8_t *)src.buf, (const uint8_t *)key.buf, k, shift, bits, (uint8_t *)out.buf,
                         src.len / k, gather);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "%s: %zd, %zd and %zd bytes of %d-byte elements, key bits %d from %d",
                     gather ? "unpermute_key" : "permute_key", src.len, key.len, out.len, k, bits, shift);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&key);
    PyBuffer_Release(&out);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *permute_key(PyObject *self, PyObject *args) { return permute_key_any(args, 0); }

static PyObject *unpermute_key(PyObject *self, PyObject *args) { return permute_key_any(args, 1); }

/* -- strict JSON ------------------------------------------------------------------------------ */

static PyObject *json_pairs(PyObject *self, PyObject *pairs) {
    if (!PyList_CheckExact(pairs)) {
        PyErr_SetString(PyExc_TypeError, "json_pairs: a list of (key, value) pairs");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    /* A key's __hash__ or __eq__ (a caller's objects, never json's str) may change the list: its
     * length is read again each time and the pair held while it is added. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pairs); i++) {
        PyObject *kv = PyList_GET_ITEM(pairs, i);
        if (!PyTuple_CheckExact(kv) || PyTuple_GET_SIZE(kv) != 2) {
            PyErr_SetString(PyExc_TypeError, "json_pairs: a list of (key, value) pairs");
            goto fail;
        }
        Py_INCREF(kv);
        int bad = PyDict_SetItem(d, PyTuple_GET_ITEM(kv, 0), PyTuple_GET_ITEM(kv, 1)) < 0;
        Py_DECREF(kv);
        if (bad)
            goto fail;
    }
    if (PyList_GET_SIZE(pairs) != n) {
        PyErr_SetString(PyExc_ValueError, "json_pairs: the pairs changed while they were read");
        goto fail;
    }
    if (PyDict_GET_SIZE(d) != n) {
        PyErr_SetString(PyExc_ValueError, "duplicate key in a JSON object");
        goto fail;
    }
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static int json_number_ok(PyObject *c) {
    /* 1: within range; 0: not (ValueError set); -1: another error */
    if (PyLong_CheckExact(c)) {
        int overflow = 0;
        PyLong_AsLongLongAndOverflow(c, &overflow);
        if (overflow == 0)
            return PyErr_Occurred() ? -1 : 1;
        if (overflow > 0) {
            PyLong_AsUnsignedLongLong(c);
            if (!PyErr_Occurred())
                return 1;
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear();
        }
        PyObject *text = PyObject_Str(c);
        if (text == NULL)
            return -1;
        PyObject *head = PyUnicode_Substring(text, 0, 40);
        Py_DECREF(text);
        if (head == NULL)
            return -1;
        PyErr_Format(PyExc_ValueError, "integer %U outside [-2**63, 2**64)", head);
        Py_DECREF(head);
        return 0;
    }
    if (PyFloat_CheckExact(c) && isinf(PyFloat_AS_DOUBLE(c))) {
        PyErr_SetString(PyExc_ValueError, "a number overflows a float");
        return 0;
    }
    return 1;
}

/* Containers nest at most max_depth deep: the value at the top is at depth 0, and a container
 * at depth max_depth is one too many (as the level-by-level walk in Python counts). */
static int json_walk(PyObject *v, int depth, int numbers, int max_depth) {
    Py_ssize_t pos = 0, n = 0;
    PyObject *key, *c;
    int is_dict = PyDict_CheckExact(v);
    if (!is_dict)
        n = PyList_GET_SIZE(v);
    for (Py_ssize_t i = 0;; i++) {
        if (is_dict) {
            if (!PyDict_Next(v, &pos, &key, &c))
                break;
        } else {
            if (i >= n)
                break;
            c = PyList_GET_ITEM(v, i);
        }
        if (PyDict_CheckExact(c) || PyList_CheckExact(c)) {
            if (depth + 1 >= max_depth) {
                PyErr_Format(PyExc_ValueError, "containers nest deeper than %d", max_depth);
                return -1;
            }
            if (json_walk(c, depth + 1, numbers, max_depth) < 0)
                return -1;
        } else if (numbers && json_number_ok(c) != 1) {
            return -1;
        }
    }
    return 0;
}

static PyObject *json_check(PyObject *self, PyObject *args) {
    PyObject *value;
    int numbers, max_depth;
    if (!PyArg_ParseTuple(args, "Opi:json_check", &value, &numbers, &max_depth))
        return NULL;
    if (max_depth < 1 || max_depth > 1000) {
        PyErr_SetString(PyExc_ValueError, "json_check: depth must lie in [1, 1000]");
        return NULL;
    }
    if ((PyDict_CheckExact(value) || PyList_CheckExact(value)) && json_walk(value, 0, numbers, max_depth) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"unpack_bits", unpack_bits, METH_VARARGS, "unpack_bits(packed, out): LSB-first bits into 0/1 bytes"},
    {"join_planes", join_planes, METH_VARARGS, "join_planes(planes, out): byte planes into elements"},
    {"split_planes", split_planes, METH_VARARGS,
     "split_planes(src, k, r, out): k-byte elements into k byte planes; r >= 1 stores the top two as planes-exp's S, T"},
    {"join_exponent", join_exponent, METH_VARARGS, "join_exponent(low, s, t, r, out): planes-exp's planes into elements"},
    {"tall_f32", tall_f32, METH_VARARGS, "tall_f32(base, merged, mask, out, bits=False): out = base + mask * merged"},
    {"tall_planes", tall_planes, METH_VARARGS,
     "tall_planes(base_planes, rb, merged_planes, rm, mask, out, bits=False): tall_f32 with base and merged as stored planes"},
    {"tall_planes_bf16", tall_planes_bf16, METH_VARARGS,
     "tall_planes_bf16(base_planes, rb, merged_planes, rm, mask, out, bits=False): tall_planes for a bfloat16 base and output"},
    {"tall_planes_f16", tall_planes_f16, METH_VARARGS,
     "tall_planes_f16(base_planes, rb, merged_planes, rm, mask, out, bits=False): tall_planes for a float16 base and output"},
    {"tall_mask_f32", tall_mask_f32, METH_VARARGS,
     "tall_mask_f32(tau, merged, lam, mask, state, at): the TALL mask, its set bits returned, and the fidelity sums "
     "of elements [at, at + n) of a tensor added to state"},
    {"tv_sum", tv_sum, METH_VARARGS,
     "tv_sum(base, thetas, kind, out): out = sum of widen(thetas[t]) - widen(base), float32, in task order"},
    {"tall_mask_tv", tall_mask_tv, METH_VARARGS,
     "tall_mask_tv(theta, base, kind, merged, lam, mask, state, at): tall_mask_f32 of tau = widen(theta) - widen(base)"},
    {"max_abs_diff", max_abs_diff, METH_VARARGS,
     "max_abs_diff(theta, base, kind): the largest |theta - base| (widened to float32) as its float32 bits"},
    {"ties_hist", ties_hist, METH_VARARGS,
     "ties_hist(theta, base, kind, b, hist): counts of |tau|'s high 16 bits (b < 0), or of the low 16 where the high are b"},
    {"ties_signs", ties_signs, METH_VARARGS,
     "ties_signs(base, thetas, kind, thr, n): (elements whose TIES trimmed sum is > 0, < 0)"},
    {"ties_merge", ties_merge, METH_VARARGS,
     "ties_merge(base, thetas, kind, thr, s0, out, counts): TIES' disjoint sum and counts"},
    {"merge_apply", merge_apply, METH_VARARGS,
     "merge_apply(theta, kind, d, masks, k, counts, alpha, out): out = theta + alpha * d (d masked by the masks' "
     "consensus, divided by max(counts, 1)), in theta's dtype; returns flags (1 out, 2 theta or d not finite)"},
    {"bitsplit", bitsplit, METH_VARARGS,
     "bitsplit(src, k, heads, low): codec bitsplit's head bytes and LSB-first low-bit stream; returns its bytes"},
    {"permute_key", permute_key, METH_VARARGS,
     "permute_key(src, key, k, shift, bits, out): src's k-byte elements in the stable order of their keys' bit field"},
    {"unpermute_key", unpermute_key, METH_VARARGS,
     "unpermute_key(src, key, k, shift, bits, out): the inverse of permute_key with the same keys"},
    {"bitjoin", bitjoin, METH_VARARGS,
     "bitjoin(heads, low, k, out): codec bitsplit's k-byte elements from head bytes and low bits; 0, or -1/-2/-3"},
    {"json_pairs", json_pairs, METH_O, "json_pairs(pairs): a dict of JSON object pairs; ValueError on a duplicate key"},
    {"json_check", json_check, METH_VARARGS,
     "json_check(value, numbers, depth): nesting below depth; with numbers, ints within int64/uint64 and floats finite"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "tallpack's compiled hot loops", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    init_unpacked();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "STREAM_BYTES", STREAM_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
