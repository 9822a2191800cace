#include "ts_huff.h"
#include <string.h>

#define MB TS_HUF_MAX_BITS
#define KRAFT_ONE (1u << MB)

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v; /* little-endian hosts only (checked in ts_codec.c) */
}

static inline void store64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static inline uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

void ts_huf_count(const uint8_t *src, size_t n, uint64_t counts[256])
{
    uint32_t c[4][256];
    memset(c, 0, sizeof c);
    memset(counts, 0, 256 * sizeof counts[0]);
    size_t i = 0;
    while (i < n) {
        /* flush the 32-bit sub-histograms before they can overflow */
        size_t end = n - i > ((size_t)1 << 30) ? i + ((size_t)1 << 30) : n;
        for (; i + 4 <= end; i += 4) {
            c[0][src[i]]++;
            c[1][src[i + 1]]++;
            c[2][src[i + 2]]++;
            c[3][src[i + 3]]++;
        }
        for (; i < end; i++) c[0][src[i]]++;
        for (int s = 0; s < 256; s++) {
            counts[s] += (uint64_t)c[0][s] + c[1][s] + c[2][s] + c[3][s];
            c[0][s] = c[1][s] = c[2][s] = c[3][s] = 0;
        }
    }
}

int ts_huf_lengths(const uint64_t counts[256], uint8_t lens[256])
{
    uint8_t sym[256];
    int m = 0;
    memset(lens, 0, 256);
    for (int s = 0; s < 256; s++)
        if (counts[s]) sym[m++] = (uint8_t)s;
    if (m < 2) return m;
    /* stable insertion sort by count (symbols already ascending) */
    for (int i = 1; i < m; i++) {
        uint8_t v = sym[i];
        int j = i - 1;
        while (j >= 0 && counts[sym[j]] > counts[v]) {
            sym[j + 1] = sym[j];
            j--;
        }
        sym[j + 1] = v;
    }
    uint64_t w[511];
    int parent[511];
    for (int i = 0; i < m; i++) w[i] = counts[sym[i]];
    int li = 0, ii = m, next = m;
    for (int step = 0; step < m - 1; step++) {
        int pick[2];
        for (int k = 0; k < 2; k++) {
            if (li < m && (ii >= next || w[li] <= w[ii]))
                pick[k] = li++;
            else
                pick[k] = ii++;
        }
        w[next] = w[pick[0]] + w[pick[1]];
        parent[pick[0]] = parent[pick[1]] = next;
        next++;
    }
    int depth[511];
    int root = 2 * m - 2;
    depth[root] = 0;
    for (int node = root - 1; node >= 0; node--) depth[node] = depth[parent[node]] + 1;

    uint32_t kraft = 0;
    for (int i = 0; i < m; i++) {
        int d = depth[i] > MB ? MB : depth[i];
        lens[sym[i]] = (uint8_t)d;
        kraft += 1u << (MB - d);
    }
    while (kraft > KRAFT_ONE) {
        int best = -1;
        for (int s = 0; s < 256; s++) {
            if (!lens[s] || lens[s] >= MB) continue;
            if (best < 0 || lens[s] > lens[best] ||
                (lens[s] == lens[best] && (counts[s] < counts[best] ||
                                           (counts[s] == counts[best] && s > best))))
                best = s;
        }
        lens[best]++;
        kraft -= 1u << (MB - lens[best]);
    }
    for (;;) {
        int best = -1;
        for (int s = 0; s < 256; s++) {
            if (lens[s] <= 1) continue;
            if ((1u << (MB - lens[s])) > KRAFT_ONE - kraft) continue;
            if (best < 0 || counts[s] > counts[best]) best = s;
        }
        if (best < 0) break;
        kraft += 1u << (MB - lens[best]);
        lens[best]--;
    }
    return m;
}

/* Canonical codes, bit-reversed over their length (so they can be emitted LSB-first). */
static void canonical_rev(const uint8_t lens[256], uint16_t rev[256])
{
    uint16_t count[MB + 1] = {0}, next[MB + 2];
    for (int s = 0; s < 256; s++) count[lens[s]]++;
    count[0] = 0;
    uint16_t code = 0;
    for (int l = 1; l <= MB; l++) {
        code = (uint16_t)((code + count[l - 1]) << 1);
        next[l] = code;
    }
    for (int s = 0; s < 256; s++) {
        int l = lens[s];
        rev[s] = 0;
        if (!l) continue;
        uint16_t c = next[l]++, r = 0;
        for (int b = 0; b < l; b++) r |= (uint16_t)(((c >> b) & 1u) << (l - 1 - b));
        rev[s] = r;
    }
}

static void split4(size_t n, size_t start[5])
{
    size_t q = (n + 3) / 4;
    for (int j = 0; j <= 4; j++) start[j] = (size_t)j * q < n ? (size_t)j * q : n;
}

uint64_t ts_huf_size(const uint8_t *src, size_t n, const uint8_t lens[256])
{
    size_t st[5];
    split4(n, st);
    uint64_t total = TS_HUF_HEADER;
    for (int j = 0; j < 4; j++) {
        uint64_t bits = 0;
        for (size_t i = st[j]; i < st[j + 1]; i++) bits += lens[src[i]];
        total += (bits + 7) / 8;
    }
    return total;
}

ts_status ts_huf_encode(const uint8_t *src, size_t n, uint8_t *dst, size_t dst_cap, size_t limit,
                        size_t *out_size)
{
    uint64_t counts[256];
    uint8_t lens[256];
    uint16_t rev[256];
    ts_huf_count(src, n, counts);
    if (ts_huf_lengths(counts, lens) < 2) return TS_E_ARG;
    size_t st[5];
    split4(n, st);
    uint64_t bytes[4], total = TS_HUF_HEADER;
    for (int j = 0; j < 4; j++) {
        uint64_t c[256] = {0}, bits = 0;
        ts_huf_count(src + st[j], st[j + 1] - st[j], c);
        for (int s = 0; s < 256; s++) bits += c[s] * lens[s];
        bytes[j] = (bits + 7) / 8;
        total += bytes[j];
    }
    if (total > limit) return TS_E_LIMIT;
    if (total + TS_HUF_SLACK > dst_cap) return TS_E_ARG;
    canonical_rev(lens, rev);
    for (int j = 0; j < 128; j++) dst[j] = (uint8_t)(lens[2 * j] | (lens[2 * j + 1] << 4));
    for (int j = 0; j < 3; j++) {
        uint32_t v = (uint32_t)bytes[j];
        dst[128 + 4 * j] = (uint8_t)v;
        dst[129 + 4 * j] = (uint8_t)(v >> 8);
        dst[130 + 4 * j] = (uint8_t)(v >> 16);
        dst[131 + 4 * j] = (uint8_t)(v >> 24);
    }
    uint8_t *out = dst + TS_HUF_HEADER;
    for (int j = 0; j < 4; j++) {
        uint64_t acc = 0;
        unsigned nb = 0;
        uint8_t *p = out;
        size_t i = st[j], e = st[j + 1];
        for (; i + 4 <= e; i += 4) {
            acc |= (uint64_t)rev[src[i]] << nb;
            nb += lens[src[i]];
            acc |= (uint64_t)rev[src[i + 1]] << nb;
            nb += lens[src[i + 1]];
            acc |= (uint64_t)rev[src[i + 2]] << nb;
            nb += lens[src[i + 2]];
            acc |= (uint64_t)rev[src[i + 3]] << nb;
            nb += lens[src[i + 3]];
            store64(p, acc); /* nb <= 7 + 44 < 64 */
            p += nb >> 3;
            acc >>= nb & ~7u;
            nb &= 7;
        }
        for (; i < e; i++) {
            acc |= (uint64_t)rev[src[i]] << nb;
            nb += lens[src[i]];
            store64(p, acc);
            p += nb >> 3;
            acc >>= nb & ~7u;
            nb &= 7;
        }
        if (nb) *p++ = (uint8_t)acc;
        out += bytes[j]; /* == p - out by construction */
    }
    *out_size = (size_t)total;
    return TS_OK;
}

/* Multi-symbol table: entry = up to 6 symbols (bytes 0..5) | count (byte 6) | bits used (byte 7),
 * the whole codes that fit in the 11-bit window at that index (at least one: codes are <= 11 bits).
 * Returns the largest count. */
#define MULTI_MIN 65536 /* below this the table build costs more than it saves */
#define MULTI_SYMS 6

static unsigned build_multi(const uint16_t table[KRAFT_ONE], uint64_t multi[KRAFT_ONE])
{
    unsigned maxc = 1;
    for (uint32_t idx = 0; idx < KRAFT_ONE; idx++) {
        uint64_t syms = 0;
        unsigned used = 0, count = 0;
        while (count < MULTI_SYMS) {
            uint16_t e = table[(idx >> used) & (KRAFT_ONE - 1)];
            unsigned len = e & 15;
            if (used + len > MB) break;
            syms |= (uint64_t)(e >> 4) << (8 * count);
            count++;
            used += len;
        }
        if (count > maxc) maxc = count;
        multi[idx] = syms | ((uint64_t)count << 48) | ((uint64_t)used << 56);
    }
    return maxc;
}

typedef struct {
    const uint8_t *p; /* sub-stream start */
    uint64_t size;    /* bytes */
    uint64_t pos;     /* bits consumed */
} bitstream;

/* Read 64 bits at bit position pos, bits past the end read as zero. */
static inline uint64_t peek_safe(const bitstream *b)
{
    uint64_t byte = b->pos >> 3;
    uint8_t tmp[8] = {0};
    for (int k = 0; k < 8 && byte + (uint64_t)k < b->size; k++) tmp[k] = b->p[byte + k];
    return load64(tmp) >> (b->pos & 7);
}

ts_status ts_huf_decode(const uint8_t *src, size_t size, uint8_t *dst, size_t n)
{
    return ts_huf_decode_ex(src, size, dst, n, NULL);
}

ts_status ts_huf_decode_ex(const uint8_t *src, size_t size, uint8_t *dst, size_t n, ts_codec_error *err)
{
    if (size < TS_HUF_HEADER) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_HUF_SHORT, size, 0, 0);
    uint8_t lens[256];
    int present = 0;
    uint32_t kraft = 0;
    for (int j = 0; j < 128; j++) {
        lens[2 * j] = src[j] & 15;
        lens[2 * j + 1] = src[j] >> 4;
    }
    for (int s = 0; s < 256; s++) {
        if (!lens[s]) continue;
        if (lens[s] > MB) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_HUF_LEN, lens[s], (uint64_t)s, 0);
        present++;
        kraft += 1u << (MB - lens[s]);
    }
    if (present < 2) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_HUF_FEW, (uint64_t)present, 0, 0);
    if (kraft != KRAFT_ONE) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_HUF_KRAFT, kraft, 0, 0);
    uint16_t rev[256], table[KRAFT_ONE];
    canonical_rev(lens, rev);
    for (int s = 0; s < 256; s++) {
        int l = lens[s];
        if (!l) continue;
        for (uint32_t f = 0; f < (KRAFT_ONE >> l); f++)
            table[rev[s] | (f << l)] = (uint16_t)((s << 4) | l);
    }
    uint64_t sz[4], avail = size - TS_HUF_HEADER, off = TS_HUF_HEADER;
    for (int j = 0; j < 3; j++) sz[j] = load32(src + 128 + 4 * j);
    if (sz[0] + sz[1] + sz[2] > avail) /* u32 sizes: the sum cannot overflow 64 bits */
        return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_HUF_SIZES, sz[0] + sz[1] + sz[2], avail, 0);
    avail -= sz[0] + sz[1] + sz[2];
    sz[3] = avail;
    bitstream bs[4];
    for (int j = 0; j < 4; j++) {
        bs[j].p = src + off;
        bs[j].size = sz[j];
        bs[j].pos = 0;
        off += sz[j];
    }
    size_t st[5];
    split4(n, st);
    size_t at[4] = {st[0], st[1], st[2], st[3]};
    /* fast path for long planes: one lookup in an 11-bit window yields every whole code in it (up
     * to 6 symbols, about 4 on bfloat16 exponent planes, 1.5 on float16 ones), 5 lookups per 64-bit
     * refill, the 4 streams interleaved lookup by lookup for instruction-level parallelism. Each
     * lookup stores 8 bytes, so a stream's writes must stay inside its own output region (never into
     * the next stream's, decoded in the same loop). Rounds run in batches sized so that no stream
     * can reach the end of its input or output region inside the batch: no per-round checks. */
    if (n >= MULTI_MIN) {
        uint64_t multi[KRAFT_ONE];
        unsigned maxc = build_multi(table, multi);
        const uint8_t *mb = (const uint8_t *)multi;
        /* per round and stream: <= 5 * MB = 55 bits read from a 64-bit load at a bit offset <= 7,
         * output advances <= 5 * maxc, the last store ends <= 4 * maxc + 8 past the round's start */
        const uint64_t out_round = 5u * maxc, out_tail = 4u * maxc + 8;
        const uint8_t *q[4];
        uint8_t *o[4];
        unsigned u[4];
        for (int j = 0; j < 4; j++) {
            q[j] = bs[j].p + (bs[j].pos >> 3);
            u[j] = (unsigned)(bs[j].pos & 7);
            o[j] = dst + at[j];
        }
        for (;;) {
            uint64_t rounds = UINT64_MAX;
            for (int j = 0; j < 4; j++) {
                uint64_t pos = (uint64_t)(q[j] - bs[j].p) * 8 + u[j];
                uint64_t left = (uint64_t)(dst + st[j + 1] - o[j]);
                if (bs[j].size < 8 || pos > (bs[j].size - 8) * 8 || left < out_tail) {
                    rounds = 0;
                    break;
                }
                /* a round starting at bit b loads bytes [b / 8, b / 8 + 8): b <= (size - 8) * 8 */
                uint64_t r_in = ((bs[j].size - 8) * 8 - pos) / 55 + 1;
                uint64_t r_out = (left - out_tail) / out_round + 1;
                uint64_t r = r_in < r_out ? r_in : r_out;
                if (r < rounds) rounds = r;
            }
            if (rounds < 4) break;
            const uint8_t *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
            uint8_t *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];
            unsigned u0 = u[0], u1 = u[1], u2 = u[2], u3 = u[3];
            for (uint64_t r = 0; r < rounds; r++) {
                uint64_t b0 = load64(q0) >> u0, b1 = load64(q1) >> u1;
                uint64_t b2 = load64(q2) >> u2, b3 = load64(q3) >> u3;
#define TS_HUF_LOOK(b, o, uu)                                                                            \
    do {                                                                                                 \
        size_t ix_ = (size_t)((b) & (KRAFT_ONE - 1)) * 8;                                                \
        unsigned c_ = mb[ix_ + 7];                                                                       \
        store64((o), load64(mb + ix_));                                                                  \
        (o) += mb[ix_ + 6];                                                                              \
        (b) >>= c_;                                                                                      \
        (uu) += c_;                                                                                      \
    } while (0)
                for (int k = 0; k < 5; k++) {
                    TS_HUF_LOOK(b0, o0, u0);
                    TS_HUF_LOOK(b1, o1, u1);
                    TS_HUF_LOOK(b2, o2, u2);
                    TS_HUF_LOOK(b3, o3, u3);
                }
#undef TS_HUF_LOOK
                q0 += u0 >> 3, u0 &= 7;
                q1 += u1 >> 3, u1 &= 7;
                q2 += u2 >> 3, u2 &= 7;
                q3 += u3 >> 3, u3 &= 7;
            }
            q[0] = q0, q[1] = q1, q[2] = q2, q[3] = q3;
            o[0] = o0, o[1] = o1, o[2] = o2, o[3] = o3;
            u[0] = u0, u[1] = u1, u[2] = u2, u[3] = u3;
        }
        for (int j = 0; j < 4; j++) {
            bs[j].pos = (uint64_t)(q[j] - bs[j].p) * 8 + u[j];
            at[j] = (size_t)(o[j] - dst);
        }
    }
    /* then one symbol per lookup, 5 per refill, while 8 bytes are readable */
    for (int j = 0; j < 4; j++) {
        while ((bs[j].pos >> 3) + 8 <= bs[j].size && at[j] + 5 <= st[j + 1]) {
            uint64_t bits = load64(bs[j].p + (bs[j].pos >> 3)) >> (bs[j].pos & 7);
            unsigned used = 0;
            for (int k = 0; k < 5; k++) {
                uint16_t e = table[(bits >> used) & (KRAFT_ONE - 1)];
                dst[at[j] + (size_t)k] = (uint8_t)(e >> 4);
                used += e & 15;
            }
            bs[j].pos += used;
            at[j] += 5;
        }
    }
    for (int j = 0; j < 4; j++) {
        while (at[j] < st[j + 1]) {
            uint64_t bits = peek_safe(&bs[j]);
            uint16_t e = table[bits & (KRAFT_ONE - 1)];
            bs[j].pos += e & 15;
            if (bs[j].pos > bs[j].size * 8) /* sub-stream ends early */
                return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_HUF_EARLY, (uint64_t)j, st[j + 1] - st[j], bs[j].size);
            dst[at[j]++] = (uint8_t)(e >> 4);
        }
        uint64_t used = (bs[j].pos + 7) / 8;
        if (used != bs[j].size) /* trailing bytes */
            return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_HUF_LEFTOVER, (uint64_t)j, bs[j].size - used, used);
    }
    return TS_OK;
}
