/* Tests of ts_rans (order-0 rANS, codec 4): normalisation invariants, round trips, hostile streams. */
#include "../ts_huff.h"
#include "../ts_rans.h"
#include "tst.h"

static void rans_roundtrip(const uint8_t *src, size_t n)
{
    size_t distinct = 0;
    uint8_t seen[256] = {0};
    for (size_t i = 0; i < n; i++) distinct += !seen[src[i]]++;
    if (distinct < 2) return; /* one distinct symbol: see test_rans_single_symbol */
    size_t cap = 2 * n + 1024, sz = 0;
    uint8_t *enc = tst_xmalloc(cap);
    ts_status st = ts_rans_encode(src, n, enc, cap, cap, &sz);
    CHECK_ST(st, TS_OK);
    if (st == TS_OK) {
        /* exact-size copies so ASan catches any access past either end */
        uint8_t *stream = tst_xmalloc(sz), *dec = tst_xmalloc(n);
        memcpy(stream, enc, sz);
        CHECK_ST(ts_rans_decode(stream, sz, dec, n), TS_OK);
        CHECK_MEM(dec, src, n);
        /* the limit: exactly the size is fine, one less is not */
        CHECK_ST(ts_rans_encode(src, n, enc, cap, sz, &sz), TS_OK);
        CHECK_ST(ts_rans_encode(src, n, enc, cap, sz - 1, &sz), TS_E_LIMIT);
        free(stream);
        free(dec);
    }
    free(enc);
}

/* docs/native-api.md "rANS frequencies", written out again */
static void ref_normalize(const uint64_t c[256], uint64_t n, uint32_t f[256])
{
    long sum = 0;
    for (int s = 0; s < 256; s++) {
        f[s] = c[s] ? (uint32_t)(c[s] * 4096 / n) : 0;
        if (c[s] && f[s] == 0) f[s] = 1;
        sum += f[s];
    }
    for (; sum < 4096; sum++) {
        int b = -1;
        for (int s = 0; s < 256; s++)
            if (c[s] && (b < 0 || c[s] * f[b] > c[b] * f[s])) b = s;
        f[b]++;
    }
    for (; sum > 4096; sum--) {
        int b = -1;
        for (int s = 0; s < 256; s++)
            if (f[s] > 1 && (b < 0 || c[s] * f[b] < c[b] * f[s])) b = s;
        f[b]--;
    }
}

/* docs/format.md section 7 encoder, 64-bit arithmetic, words collected then reversed */
static size_t ref_rans_encode(const uint8_t *src, size_t n, uint8_t *out)
{
    uint64_t c[256] = {0};
    uint32_t f[256], cum[256];
    for (size_t i = 0; i < n; i++) c[src[i]]++;
    ref_normalize(c, n, f);
    uint32_t acc = 0;
    for (int s = 0; s < 256; s++) {
        cum[s] = acc;
        acc += f[s];
    }
    size_t k = 0;
    for (int s = 0; s < 256; s++) {
        if (f[s] < 128) out[k++] = (uint8_t)f[s];
        else {
            out[k++] = (uint8_t)(0x80 | (f[s] & 0x7F));
            out[k++] = (uint8_t)(f[s] >> 7);
        }
    }
    uint64_t x[8];
    for (int j = 0; j < 8; j++) x[j] = 1u << 16;
    uint16_t *words = tst_xmalloc((2 * n + 16) * sizeof *words);
    size_t nw = 0;
    for (size_t i = n; i-- > 0;) {
        int j = (int)(i % 8);
        uint64_t fs = f[src[i]];
        while (x[j] >= (fs << 20)) {
            words[nw++] = (uint16_t)(x[j] & 0xFFFF);
            x[j] >>= 16;
        }
        x[j] = ((x[j] / fs) << 12) + (x[j] % fs) + cum[src[i]];
    }
    for (int j = 0; j < 8; j++)
        for (int b = 0; b < 4; b++) out[k++] = (uint8_t)(x[j] >> (8 * b));
    for (size_t w = nw; w-- > 0;) {
        out[k++] = (uint8_t)words[w];
        out[k++] = (uint8_t)(words[w] >> 8);
    }
    free(words);
    return k;
}

static void test_rans_reference(void)
{
    size_t sizes[] = {2, 7, 8, 9, 16, 17, 100, 1000, 4097, 70000};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        size_t n = sizes[si];
        uint8_t *src = tst_xmalloc(n), *a = tst_xmalloc(2 * n + 1024), *b = tst_xmalloc(2 * n + 1024);
        for (int variant = 0; variant < 4; variant++) {
            for (size_t i = 0; i < n; i++) {
                uint64_t r = tst_rand();
                switch (variant) {
                case 0: src[i] = (uint8_t)r; break;
                case 1: src[i] = (uint8_t)__builtin_ctzll(r | (1ull << 63)); break;
                case 2: src[i] = (uint8_t)((r % 97) ? 0 : 1 + r % 3); break;
                default: src[i] = (uint8_t)(i % 2 ? 0x80 : r % 200); break;
                }
            }
            src[0] = 0;
            src[n - 1] = 1; /* at least two symbols */
            size_t sz = 0, rsz = ref_rans_encode(src, n, b);
            CHECK_ST(ts_rans_encode(src, n, a, 2 * n + 1024, 2 * n + 1024, &sz), TS_OK);
            CHECK_U64(sz, rsz);
            CHECK_MEM(a, b, rsz);
        }
        free(src);
        free(a);
        free(b);
    }
}

static void test_rans_normalize(void)
{
    for (int iter = 0; iter < 2000; iter++) {
        uint64_t c[256] = {0}, n = 0;
        int nsym = 1 + (int)(tst_rand() % 256);
        for (int k = 0; k < nsym; k++) {
            int s = (int)(tst_rand() % 256);
            switch (iter % 4) {
            case 0: c[s] += 1 + tst_rand() % 5; break;
            case 1: c[s] += 1ull << (tst_rand() % 40); break;
            case 2: c[s] += 1 + tst_rand() % 100000; break;
            default: c[s] += (k == 0) ? (1ull << 47) : 1; break;
            }
        }
        for (int s = 0; s < 256; s++) n += c[s];
        uint32_t f[256], g[256];
        ts_rans_normalize(c, n, f);
        ref_normalize(c, n, g);
        uint32_t sum = 0;
        int ok = 1;
        for (int s = 0; s < 256; s++) {
            sum += f[s];
            if ((c[s] == 0) != (f[s] == 0)) ok = 0;
        }
        CHECK(ok);
        CHECK_U64(sum, 1u << TS_RANS_PROB_BITS);
        CHECK_MEM(f, g, sizeof f); /* the documented algorithm */
    }
    /* a single symbol gets the whole range */
    uint64_t c[256] = {0};
    uint32_t f[256];
    c[42] = 1000;
    ts_rans_normalize(c, 1000, f);
    CHECK_U64(f[42], 4096);
}

static void test_rans_roundtrips(void)
{
    for (size_t n = 1; n <= 50; n++) {
        uint8_t buf[50];
        for (int variant = 0; variant < 4; variant++) {
            for (size_t i = 0; i < n; i++) {
                switch (variant) {
                case 0: buf[i] = (uint8_t)tst_rand(); break;
                case 1: buf[i] = (uint8_t)(tst_rand() % 2 ? 3 : 250); break;
                case 2: buf[i] = (uint8_t)(tst_rand() % 9 == 0 ? tst_rand() : 7); break;
                default: buf[i] = (uint8_t)(i == n - 1 ? 1 : 0); break;
                }
            }
            rans_roundtrip(buf, n);
        }
    }
    size_t sizes[] = {51, 255, 4096, 65537, 1u << 20};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        size_t n = sizes[si];
        uint8_t *buf = tst_xmalloc(n);
        for (int variant = 0; variant < 5; variant++) {
            for (size_t i = 0; i < n; i++) {
                uint64_t r = tst_rand();
                switch (variant) {
                case 0: buf[i] = (uint8_t)r; break;
                case 1: buf[i] = (uint8_t)__builtin_ctzll(r | (1ull << 63)); break;
                case 2: buf[i] = (uint8_t)((r & 1) ? 0x3F : 0x40); break;
                case 3: buf[i] = (uint8_t)(i % 256); break;
                default: buf[i] = (uint8_t)((r % 1000) ? 9 : (r >> 20)); break; /* very skewed */
                }
            }
            rans_roundtrip(buf, n);
        }
        free(buf);
    }
}

static void test_rans_single_symbol(void)
{
    /* "Encode n >= 1 bytes": a plane of one distinct byte (fill covers it inside ts_encode_planes, but
     * the public encoder accepts it). freq = 4096 makes `f << 20` wrap to 0 in 32 bits. */
    uint8_t src[100];
    memset(src, 0x11, sizeof src);
    for (size_t n = 1; n <= 100; n += 99) {
        uint8_t enc[2048], dec[100];
        size_t sz = 0;
        ts_status st = ts_rans_encode(src, n, enc, sizeof enc, sizeof enc, &sz);
        ts_status st2 = st == TS_OK ? ts_rans_decode(enc, sz, dec, n) : st;
        KNOWN_BUG(st != TS_OK || (st2 == TS_OK && memcmp(dec, src, n) == 0),
                  "RANS-SINGLE (ts_rans_encode of a one-symbol input returns TS_OK with a stream that "
                  "ts_rans_decode rejects: freq 4096 << 20 overflows uint32)");
    }
}

static void test_rans_encode_args(void)
{
    uint8_t enc[600];
    size_t sz = 5;
    CHECK_ST(ts_rans_encode((const uint8_t *)"", 0, enc, sizeof enc, sizeof enc, &sz), TS_E_ARG);
    CHECK_ST(ts_rans_encode((const uint8_t *)"ab", 2, enc, sizeof enc, 10, &sz), TS_E_LIMIT);
    CHECK_U64(sz, 5);
    CHECK_ST(ts_rans_encode((const uint8_t *)"ab", 2, enc, sizeof enc, sizeof enc, &sz), TS_OK);
    /* table: 256 varints (two 2048s take 2 bytes each) + 8 states */
    CHECK_U64(sz, 254 + 4 + 32);
    uint8_t dec[2];
    CHECK_ST(ts_rans_decode(enc, sz, dec, 2), TS_OK);
    CHECK_MEM(dec, "ab", 2);
}

/* build a table by hand: freq per symbol as varints */
static size_t put_table(uint8_t *p, const uint32_t f[256])
{
    size_t k = 0;
    for (int s = 0; s < 256; s++) {
        if (f[s] < 128) {
            p[k++] = (uint8_t)f[s];
        } else {
            p[k++] = (uint8_t)(0x80 | (f[s] & 0x7F));
            p[k++] = (uint8_t)(f[s] >> 7);
        }
    }
    return k;
}

static void test_rans_decode_rejects(void)
{
    /* a valid stream to mutate */
    size_t n = 3000, cap = 8192, sz = 0;
    uint8_t *src = tst_xmalloc(n), *enc = tst_xmalloc(cap), *dec = tst_xmalloc(n);
    for (size_t i = 0; i < n; i++) src[i] = (uint8_t)__builtin_ctzll(tst_rand() | (1ull << 30));
    CHECK_ST(ts_rans_encode(src, n, enc, cap, cap, &sz), TS_OK);
    CHECK_ST(ts_rans_decode(enc, sz, dec, n), TS_OK);
    /* every truncation of the stream */
    for (size_t len = 0; len < sz; len += (len < 400 ? 1 : 37)) {
        uint8_t *p = tst_xmalloc(len);
        memcpy(p, enc, len);
        CHECK_ST(ts_rans_decode(p, len, dec, n), TS_E_CORRUPT);
        free(p);
    }
    /* trailing bytes: one (odd), two (an unread word) */
    uint8_t *longer = tst_xmalloc(sz + 2);
    memcpy(longer, enc, sz);
    longer[sz] = longer[sz + 1] = 0;
    CHECK_ST(ts_rans_decode(longer, sz + 1, dec, n), TS_E_CORRUPT);
    CHECK_ST(ts_rans_decode(longer, sz + 2, dec, n), TS_E_CORRUPT);
    free(longer);
    /* wrong n: fewer symbols leave words / states over */
    CHECK_ST(ts_rans_decode(enc, sz, dec, n / 2), TS_E_CORRUPT);

    /* hand-built tables */
    uint32_t f[256] = {0};
    uint8_t t[1200];
    f[0] = 2048;
    f[1] = 2048;
    size_t k = put_table(t, f);
    CHECK_U64(k, 258);
    for (int j = 0; j < 8; j++) {
        t[k + 4 * j] = 0;
        t[k + 4 * j + 1] = 0;
        t[k + 4 * j + 2] = 1; /* state = L = 65536 */
        t[k + 4 * j + 3] = 0;
    }
    CHECK_ST(ts_rans_decode(t, k + 32, dec, 0), TS_OK); /* nothing coded, states at L */
    /* a state below L */
    t[k + 2] = 0;
    CHECK_ST(ts_rans_decode(t, k + 32, dec, 0), TS_E_CORRUPT);
    t[k + 2] = 1;
    /* a state not back at L after decoding nothing */
    t[k + 3] = 1;
    CHECK_ST(ts_rans_decode(t, k + 32, dec, 0), TS_E_CORRUPT);
    t[k + 3] = 0;
    /* frequencies not summing to 4096 */
    f[1] = 2047;
    k = put_table(t, f);
    memset(t + k, 0, 32);
    CHECK_ST(ts_rans_decode(t, k + 32, dec, 0), TS_E_CORRUPT);
    f[1] = 2049;
    k = put_table(t, f);
    CHECK_ST(ts_rans_decode(t, k + 32, dec, 0), TS_E_CORRUPT);
    /* one frequency above 4096 (4097 = 0x81 0x20) */
    memset(f, 0, sizeof f);
    f[0] = 4097;
    k = put_table(t, f);
    CHECK_ST(ts_rans_decode(t, k + 32, dec, 0), TS_E_CORRUPT);
    /* a non-minimal varint (0x80 0x00) and a too large high byte (0xFF 0xFF) */
    memset(t, 0, sizeof t);
    t[0] = 0x80;
    t[1] = 0x00;
    CHECK_ST(ts_rans_decode(t, 300, dec, 0), TS_E_CORRUPT);
    t[0] = 0xFF;
    t[1] = 0xFF;
    CHECK_ST(ts_rans_decode(t, 300, dec, 0), TS_E_CORRUPT);
    /* the table runs past the end: every length up to the whole table */
    memset(f, 0, sizeof f);
    for (int s = 0; s < 256; s++) f[s] = 16;
    k = put_table(t, f);
    CHECK_U64(k, 256);
    for (size_t len = 0; len < k + 32; len++) CHECK_ST(ts_rans_decode(t, len, dec, 0), TS_E_CORRUPT);
    free(src);
    free(enc);
    free(dec);
}

void suite_rans(void)
{
    RUN(test_rans_normalize);
    RUN(test_rans_reference);
    RUN(test_rans_roundtrips);
    RUN(test_rans_single_symbol);
    RUN(test_rans_encode_args);
    RUN(test_rans_decode_rejects);
}
