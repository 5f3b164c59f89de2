/* Round 38, a measurement prototype only: a static interleaved rANS coder for byte planes
 * (planes-exp's exponent plane), ryg_rans style. Not part of tallpack's format.
 *
 * State: 32 bits in [L, 2^32), L = 2^16, renormalised by 16-bit little-endian words; NS states
 * interleaved (symbol i by state i % NS) over one shared word stream; frequencies normalised to
 * a total of 2^scale (scale 8 to 12). One symbol needs at most one renormalisation, for any
 * state the decoder may hold, so a corrupt stream cannot make it loop or overflow.
 *
 * A chunk:   u8 scale, u8 mode (0: a table per piece, 1: one table for the chunk), u32 piece
 *            (symbols a piece, the last may be shorter), [mode 1: table], then per piece:
 *            u32 length of the piece's bytes, then [mode 0: table], NS u32 states, the words.
 * A table:   u8 first symbol, u8 (number of symbols in the range - 1), then each symbol's
 *            frequency as a LEB128 varint (at most 2 bytes); the frequencies must add up to
 *            2^scale exactly. A range of one symbol (frequency 2^scale) is a constant piece:
 *            no states, no words.
 *
 * The decoder never reads past its input (the fast loop runs only while NS words remain for a
 * round of NS symbols; the tail checks each read), refuses a table that does not add up, a
 * range past 255, a varint past 2 bytes, a piece length past the input, a state below L, and a
 * stream whose states do not end at L or whose words are not all used. (There is no checksum:
 * a damaged word can still decode to wrong symbols; the archive's hashes would catch those.)
 *
 * Speed notes (this machine, AMD EPYC, gcc 12): the renormalisation is arithmetic, not a branch
 * (taken about 1 time in 6, unpredictably: a branch is 1.6x slower); GCC's vectoriser is off
 * for the decoder (at -O3 it packed the 4 states into one register: 1.5x slower); 4 states beat
 * 2 and 8 here; about 1.3 ns a symbol at best, against about 0.4-0.6 for zstd's Huffman.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>

#ifndef NS
#define NS 4
#endif
#define RANS_L (1u << 16)
#ifndef BRANCHY
#define BRANCHY 0
#endif

typedef struct { uint16_t freq[256], start[256]; } Table;
typedef struct { uint32_t e[1 << 12]; } DTable; /* by slot: sym << 24 | bias << 12 | freq (freq < 2^12) */

int rans_ns(void) { return NS; }

static void put32(uint8_t *p, uint32_t v) { p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24; }
static uint32_t get32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

/* counts -> frequencies summing to 2^scale, every used symbol at least 1; then greedy moves of
 * one unit where they cost the fewest bits (a few per table). */
static void normalise(const uint64_t cnt[256], uint64_t n, int scale, uint16_t freq[256]) {
    const int64_t M = 1 << scale;
    int64_t sum = 0;
    for (int s = 0; s < 256; s++) {
        if (!cnt[s]) { freq[s] = 0; continue; }
        int64_t f = (int64_t)((double)cnt[s] * M / n + 0.5);
        if (f < 1) f = 1;
        if (f > M - 1) f = M - 1;
        freq[s] = (uint16_t)f; sum += f;
    }
    while (sum != M) {
        int best = -1; double bc = 0;
        for (int s = 0; s < 256; s++) {
            if (!cnt[s]) continue;
            double c;
            if (sum > M) { if (freq[s] <= 1) continue; c = cnt[s] * log2((double)freq[s] / (freq[s] - 1)); }
            else c = -(double)cnt[s] * log2((double)(freq[s] + 1) / freq[s]);
            if (best < 0 || c < bc) { best = s; bc = c; }
        }
        if (sum > M) { freq[best]--; sum--; } else { freq[best]++; sum++; }
    }
}

static size_t write_table(const uint16_t freq[256], uint8_t *out) {
    int lo = 0, hi = 255;
    while (lo < 255 && !freq[lo]) lo++;
    while (hi > lo && !freq[hi]) hi--;
    size_t p = 0;
    out[p++] = (uint8_t)lo; out[p++] = (uint8_t)(hi - lo);
    for (int s = lo; s <= hi; s++) {
        uint32_t f = freq[s];
        if (f < 128) out[p++] = (uint8_t)f;
        else { out[p++] = (uint8_t)(0x80 | (f & 0x7F)); out[p++] = (uint8_t)(f >> 7); }
    }
    return p;
}

/* returns bytes read, or -1: truncated, bad varint, or a sum other than 2^scale; *constant gets
 * the symbol of a one-symbol table, else -1 */
static long read_table(const uint8_t *in, size_t len, int scale, Table *t, int *constant) {
    if (len < 2) return -1;
    size_t p = 0;
    int lo = in[p++], cnt = in[p++] + 1;
    if (lo + cnt > 256) return -1;
    memset(t->freq, 0, sizeof t->freq);
    uint32_t sum = 0, M = 1u << scale;
    int used = 0, last = -1;
    for (int s = lo; s < lo + cnt; s++) {
        if (p >= len) return -1;
        uint32_t f = in[p++];
        if (f & 0x80) {
            if (p >= len) return -1;
            uint32_t b = in[p++];
            if (b & 0x80) return -1;
            f = (f & 0x7F) | b << 7;
        }
        if (f > M) return -1;
        sum += f;
        t->freq[s] = (uint16_t)f;
        if (f) { used++; last = s; }
    }
    if (sum != M) return -1;
    *constant = -1;
    if (used == 1) *constant = last;
    uint32_t c = 0;
    for (int s = 0; s < 256; s++) { t->start[s] = (uint16_t)c; c += t->freq[s]; }
    return (long)p;
}

static void build_dtable(const Table *t, int scale, DTable *d) {
    for (int s = 0; s < 256; s++)
        for (uint32_t k = 0; k < t->freq[s]; k++) {
            d->e[t->start[s] + k] = (uint32_t)s << 24 | k << 12 | t->freq[s];
        }
    (void)scale;
}

/* the states and words of src[0:n] (not constant); returns bytes written to out (cap at least
 * 4 * NS + 2 * n + 16) */
static size_t encode_piece(const uint8_t *src, size_t n, const Table *t, int scale, uint8_t *out, size_t cap) {
    uint32_t x[NS];
    uint32_t xmax[256];
    for (int s = 0; s < 256; s++) xmax[s] = ((RANS_L >> scale) << 16) * t->freq[s];
    for (int j = 0; j < NS; j++) x[j] = RANS_L;
    uint8_t *end = out + cap, *p = end; /* words are written backwards from the end */
    for (size_t i = n; i-- > 0;) {
        uint32_t *xs = &x[i % NS];
        int s = src[i];
        uint32_t f = t->freq[s];
        if (*xs >= xmax[s]) { p -= 2; p[0] = (uint8_t)*xs; p[1] = (uint8_t)(*xs >> 8); *xs >>= 16; }
        *xs = ((*xs / f) << scale) + (*xs % f) + t->start[s];
    }
    for (int j = NS; j-- > 0;) { p -= 4; put32(p, x[j]); }
    size_t len = (size_t)(end - p);
    memmove(out, p, len);
    return len;
}

/* 0, or -1 when the stream is not exactly one of n symbols under this table. (GCC 12 at -O3
 * packs the NS states into one vector register and extracts lanes: 3x slower; kept scalar.) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
static int decode_piece(const uint8_t *in, size_t len, const DTable *d, int scale, uint8_t *dst, size_t n) {
    if (len < 4 * NS || (len - 4 * NS) % 2) return -1;
    uint32_t x[NS];
    for (int j = 0; j < NS; j++) { x[j] = get32(in + 4 * j); if (x[j] < RANS_L) return -1; }
    const uint8_t *p = in + 4 * NS, *end = in + len;
    const uint32_t mask = (1u << scale) - 1;
    size_t i = 0;
    /* fast rounds: NS symbols read at most NS words, so while 2 * NS bytes remain, no checks */
    while (i + NS <= n && (size_t)(end - p) >= 2 * NS) {
        for (int j = 0; j < NS; j++) {
            uint32_t v = x[j], e = d->e[v & mask];
            dst[i + j] = (uint8_t)(e >> 24);
            v = (e & 0xFFF) * (v >> scale) + ((e >> 12) & 0xFFF);
#if BRANCHY  /* (2x slower here: the renormalisation is taken about 1 time in 6, unpredictably) */
            if (v < RANS_L) { v = v << 16 | p[0] | (uint32_t)p[1] << 8; p += 2; }
#else       /* arithmetic, not a branch the compiler may make: the read is in bounds */
            uint32_t need = v < RANS_L, w = p[0] | (uint32_t)p[1] << 8;
            v = v << (need << 4) | (w & (0u - need));
            p += 2 * need;
#endif
            x[j] = v;
        }
        i += NS;
    }
    for (; i < n; i++) { /* the tail: each read checked */
        uint32_t *xs = &x[i % NS], v = *xs, e = d->e[v & mask];
        dst[i] = (uint8_t)(e >> 24);
        v = (e & 0xFFF) * (v >> scale) + ((e >> 12) & 0xFFF);
        if (v < RANS_L) {
            if (end - p < 2) return -1;
            v = v << 16 | p[0] | (uint32_t)p[1] << 8; p += 2;
        }
        *xs = v;
    }
    if (p != end) return -1;
    for (int j = 0; j < NS; j++) if (x[j] != RANS_L) return -1;
    return 0;
}

size_t rans_bound(size_t n, size_t piece) {
    size_t pieces = piece ? (n + piece - 1) / piece : 1;
    return 6 + 520 + pieces * (4 + 520 + 4 * NS + 16) + 2 * n + 64;
}

static void count(const uint8_t *src, size_t n, uint64_t cnt[256]) {
    memset(cnt, 0, 256 * sizeof *cnt);
    for (size_t i = 0; i < n; i++) cnt[src[i]]++;
}

/* a chunk of n symbols in pieces of `piece` (0: one piece), mode 0 or 1; returns its size */
size_t rans_encode_chunk(const uint8_t *src, size_t n, size_t piece, int mode, int scale, uint8_t *out, size_t cap) {
    if (scale < 8 || scale > 12 || mode < 0 || mode > 1) return 0;
    if (!piece || piece > n) piece = n ? n : 1;
    if (cap < rans_bound(n, piece)) return 0;
    size_t p = 0;
    out[p++] = (uint8_t)scale; out[p++] = (uint8_t)mode; put32(out + p, (uint32_t)piece); p += 4;
    uint64_t cnt[256];
    Table t;
    int constant = -1;
    if (mode == 1) {
        count(src, n, cnt);
        normalise(cnt, n ? n : 1, scale, t.freq);
        p += write_table(t.freq, out + p);
        read_table(out + 6, p - 6, scale, &t, &constant);
    }
    for (size_t s = 0; s < n; s += piece) {
        size_t m = n - s < piece ? n - s : piece, q = p + 4;
        if (mode == 0) {
            count(src + s, m, cnt);
            normalise(cnt, m, scale, t.freq);
            size_t tl = write_table(t.freq, out + q);
            read_table(out + q, tl, scale, &t, &constant);
            q += tl;
        }
        if (constant < 0) q += encode_piece(src + s, m, &t, scale, out + q, cap - q);
        put32(out + p, (uint32_t)(q - p - 4));
        p = q;
    }
    return p;
}

/* 0, or a negative number: the chunk is not exactly n symbols in this format */
int rans_decode_chunk(const uint8_t *in, size_t len, uint8_t *dst, size_t n) {
    if (len < 6) return -1;
    int scale = in[0], mode = in[1];
    size_t piece = get32(in + 2), p = 6;
    if (scale < 8 || scale > 12 || mode > 1 || !piece || (n && piece > n) || (!n && piece != 1)) return -2;
    Table t;
    DTable d;
    int constant = -1;
    if (mode == 1) {
        long tl = read_table(in + p, len - p, scale, &t, &constant);
        if (tl < 0) return -3;
        p += (size_t)tl;
        build_dtable(&t, scale, &d);
    }
    for (size_t s = 0; s < n; s += piece) {
        size_t m = n - s < piece ? n - s : piece;
        if (len - p < 4) return -4;
        size_t pl = get32(in + p); p += 4;
        if (pl > len - p) return -4;
        const uint8_t *q = in + p, *qe = in + p + pl;
        if (mode == 0) {
            long tl = read_table(q, pl, scale, &t, &constant);
            if (tl < 0) return -3;
            q += tl;
            if (constant < 0) build_dtable(&t, scale, &d);
        }
        if (constant >= 0) {
            if (q != qe) return -5;
            memset(dst + s, constant, m);
        } else if (decode_piece(q, (size_t)(qe - q), &d, scale, dst + s, m)) return -6;
        p += pl;
    }
    return p == len ? 0 : -7;
}
