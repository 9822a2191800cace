#include "ts_rans.h"
#include "ts_huff.h" /* ts_huf_count */

#include <stdlib.h>
#include <string.h>

#define PB TS_RANS_PROB_BITS
#define M (1u << PB)
#define L (1u << 16)
#define NS TS_RANS_STATES

void ts_rans_normalize(const uint64_t counts[256], uint64_t n, uint32_t freq[256])
{
    int64_t sum = 0;
    for (int s = 0; s < 256; s++) {
        freq[s] = 0;
        if (!counts[s]) continue;
        uint64_t f = counts[s] * M / n; /* counts[s] <= n <= 2^48: no overflow */
        freq[s] = f ? (uint32_t)f : 1;
        sum += freq[s];
    }
    /* give the remainder where it gains most (largest count per unit of frequency), take the excess
     * where it costs least (smallest count per unit among those that can give one up) */
    while (sum < (int64_t)M) {
        int best = -1;
        for (int s = 0; s < 256; s++) {
            if (!counts[s]) continue;
            if (best < 0 || counts[s] * freq[best] > counts[best] * freq[s]) best = s;
        }
        freq[best]++;
        sum++;
    }
    while (sum > (int64_t)M) {
        int best = -1;
        for (int s = 0; s < 256; s++) {
            if (freq[s] <= 1) continue;
            if (best < 0 || counts[s] * freq[best] < counts[best] * freq[s]) best = s;
        }
        freq[best]--;
        sum--;
    }
}

static size_t put_varint(uint8_t *p, uint32_t v)
{
    if (v < 128) {
        p[0] = (uint8_t)v;
        return 1;
    }
    p[0] = (uint8_t)(0x80 | (v & 0x7F));
    p[1] = (uint8_t)(v >> 7);
    return 2;
}

ts_status ts_rans_encode(const uint8_t *src, size_t n, uint8_t *dst, size_t dst_cap, size_t limit,
                         size_t *out_size)
{
    if (!n) return TS_E_ARG;
    uint64_t counts[256];
    uint32_t freq[256], cum[257];
    ts_huf_count(src, n, counts);
    ts_rans_normalize(counts, n, freq);
    cum[0] = 0;
    for (int s = 0; s < 256; s++) cum[s + 1] = cum[s] + freq[s];
    uint8_t table[512];
    size_t tlen = 0;
    for (int s = 0; s < 256; s++) tlen += put_varint(table + tlen, freq[s]);
    size_t head = tlen + 4 * NS;
    if (head > limit) return TS_E_LIMIT;
    /* words are produced last-to-first: write them downwards from the end of a scratch area */
    size_t cap_words = (limit - head) / 2;
    uint16_t *words = malloc((cap_words ? cap_words : 1) * sizeof *words);
    if (!words) return TS_E_NOMEM;
    size_t w = cap_words; /* next free slot is w-1 */
    uint32_t x[NS];
    for (int j = 0; j < NS; j++) x[j] = L;
    for (size_t i = n; i-- > 0;) {
        int j = (int)(i % NS);
        uint32_t f = freq[src[i]];
        if (x[j] >= ((uint64_t)f << 20)) { /* f may be 4096: 2^32 does not fit in 32 bits */
            if (!w) {
                free(words);
                return TS_E_LIMIT;
            }
            words[--w] = (uint16_t)x[j];
            x[j] >>= 16;
        }
        x[j] = ((x[j] / f) << PB) + (x[j] % f) + cum[src[i]];
    }
    size_t nwords = cap_words - w, total = head + 2 * nwords;
    if (total > limit || total > dst_cap) {
        free(words);
        return TS_E_LIMIT;
    }
    memcpy(dst, table, tlen);
    for (int j = 0; j < NS; j++) {
        uint8_t *p = dst + tlen + 4 * j;
        p[0] = (uint8_t)x[j];
        p[1] = (uint8_t)(x[j] >> 8);
        p[2] = (uint8_t)(x[j] >> 16);
        p[3] = (uint8_t)(x[j] >> 24);
    }
    uint8_t *o = dst + head;
    for (size_t k = 0; k < nwords; k++) {
        uint16_t v = words[w + k];
        o[2 * k] = (uint8_t)v;
        o[2 * k + 1] = (uint8_t)(v >> 8);
    }
    free(words);
    *out_size = total;
    return TS_OK;
}

ts_status ts_rans_decode(const uint8_t *src, size_t size, uint8_t *dst, size_t n)
{
    return ts_rans_decode_ex(src, size, dst, n, NULL);
}

ts_status ts_rans_decode_ex(const uint8_t *src, size_t size, uint8_t *dst, size_t n, ts_codec_error *err)
{
    uint32_t freq[256];
    size_t pos = 0;
    uint32_t total = 0;
    for (int s = 0; s < 256; s++) {
        if (pos >= size) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_TABLE, (uint64_t)s, size, 0);
        uint32_t v = src[pos++];
        if (v & 0x80) {
            if (pos >= size) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_TABLE, (uint64_t)s, size, 0);
            uint32_t hi = src[pos++];
            if (hi == 0) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_VARINT, (uint64_t)s, 0, 0);
            v = (v & 0x7F) | (hi << 7);
        }
        if (v > M) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_FREQ, (uint64_t)s, v, 0);
        freq[s] = v;
        total += v;
    }
    if (total != M) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_SUM, total, 0, 0);
    uint32_t tab[M];
    uint32_t c = 0;
    for (int s = 0; s < 256; s++) {
        for (uint32_t k = 0; k < freq[s]; k++) tab[c + k] = (uint32_t)s | ((freq[s] - 1) << 8) | (c << 20);
        c += freq[s];
    }
    if (size - pos < 4u * NS) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_STATES, size - pos, 0, 0);
    uint32_t x[NS];
    for (int j = 0; j < NS; j++) {
        const uint8_t *p = src + pos + 4 * j;
        x[j] = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
        if (x[j] < L) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_STATE_LOW, (uint64_t)j, x[j], 0);
    }
    pos += 4u * NS;
    if ((size - pos) & 1) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_ODD, size - pos, 0, 0);
    const uint8_t *wp = src + pos, *wend = src + size;
    size_t i = 0;
    /* fast path: 8 symbols need at most 8 words */
    while (i + NS <= n && wend - wp >= 2 * NS) {
        for (int j = 0; j < NS; j++) {
            uint32_t e = tab[x[j] & (M - 1)];
            dst[i + j] = (uint8_t)e;
            uint32_t y = (((e >> 8) & (M - 1)) + 1) * (x[j] >> PB) + (x[j] & (M - 1)) - (e >> 20);
            /* branch-free renormalisation: a data-dependent branch here mispredicts on skewed planes */
            uint32_t need = y < L;
            uint32_t word = (uint32_t)wp[0] | ((uint32_t)wp[1] << 8);
            x[j] = (y << (need << 4)) | (word & (0u - need));
            wp += need << 1;
        }
        i += NS;
    }
    for (; i < n; i++) {
        int j = (int)(i % NS);
        uint32_t e = tab[x[j] & (M - 1)];
        dst[i] = (uint8_t)e;
        uint32_t y = (((e >> 8) & (M - 1)) + 1) * (x[j] >> PB) + (x[j] & (M - 1)) - (e >> 20);
        if (y < L) {
            if (wend - wp < 2) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_WORDS_OUT, n, 0, 0);
            y = (y << 16) | (uint32_t)wp[0] | ((uint32_t)wp[1] << 8);
            wp += 2;
        }
        x[j] = y;
    }
    if (wp != wend) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_WORDS_LEFT, (uint64_t)(wend - wp) / 2, n, 0);
    for (int j = 0; j < NS; j++)
        if (x[j] != L) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_RANS_FINAL, (uint64_t)j, x[j], 0);
    return TS_OK;
}
