/* Unit tests of the tinyserve native core (csrc/): framework, Huffman and byte-plane suites.
 * The codec and weights suites live in test_codec.c and test_weights.c. */
#include <stdarg.h>

#include "../ts_huff.h"
#include "../ts_planes.h"
#include "tst.h"

/* ------------------------------------------------------------------------------ framework */
long tst_checks, tst_failures, tst_known_bugs;
static long tests_run, tests_failed;
static const char *current = "";
static const char *filter;
static long failures_in_current;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

void tst_fail(const char *file, int line, const char *fmt, ...)
{
    tst_failures++;
    if (++failures_in_current > 25) return; /* do not drown the log */
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL [%s] %s:%d: ", current, file, line);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void tst_known_bug(const char *file, int line, const char *id, const char *what)
{
    static int strict = -1;
    if (strict < 0) strict = getenv("TS_TEST_STRICT") && atoi(getenv("TS_TEST_STRICT"));
    if (strict) {
        tst_fail(file, line, "known bug %s: expected %s", id, what);
        return;
    }
    tst_known_bugs++;
    fprintf(stderr, "KNOWN BUG [%s] %s %s:%d: expected %s\n", current, id, file, line, what);
}

uint64_t tst_rand(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void tst_seed(uint64_t s) { rng_state = s; }

void tst_fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)tst_rand();
}

void *tst_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        abort();
    }
    return p;
}

void tst_run(const char *name, void (*fn)(void))
{
    if (filter && !strstr(name, filter)) return;
    current = name;
    failures_in_current = 0;
    long before = tst_failures;
    tst_seed(0x5EED0000ull + (uint64_t)strlen(name) * 7919u + (uint64_t)(unsigned char)name[5]);
    fn();
    tests_run++;
    if (tst_failures != before) {
        tests_failed++;
        fprintf(stderr, "not ok %s (%ld failed checks)\n", name, tst_failures - before);
    } else if (getenv("TS_TEST_VERBOSE")) {
        fprintf(stderr, "ok %s\n", name);
    }
    current = "";
}

int main(int argc, char **argv)
{
    if (argc > 1) filter = argv[1];
    suite_huff();
    suite_rans();
    suite_planes();
    suite_codec();
    suite_weights();
    printf("native tests: %ld tests, %ld checks, %ld failed checks in %ld tests, %ld known bugs\n",
           tests_run, tst_checks, tst_failures, tests_failed, tst_known_bugs);
    if (tests_run == 0) {
        fprintf(stderr, "no test matched the filter\n");
        return 2;
    }
    return tst_failures ? 1 : 0;
}

/* ------------------------------------------------------------------------------ references */
/* Independent reference implementations written from docs/format.md section 6 and
 * docs/native-api.md ("Encoder determinism"), deliberately simple and slow. */

/* code lengths, step 2: two-queue Huffman where merging two subtrees deepens all their leaves */
static int ref_lengths(const uint64_t cnt[256], uint8_t len[256])
{
    int sym[256], m = 0;
    memset(len, 0, 256);
    for (int s = 0; s < 256; s++)
        if (cnt[s]) sym[m++] = s;
    if (m < 2) return m;
    /* sort leaves ascending by (count, symbol): selection sort */
    for (int i = 0; i < m; i++) {
        int b = i;
        for (int j = i + 1; j < m; j++)
            if (cnt[sym[j]] < cnt[sym[b]] || (cnt[sym[j]] == cnt[sym[b]] && sym[j] < sym[b])) b = j;
        int t = sym[i];
        sym[i] = sym[b];
        sym[b] = t;
    }
    unsigned depth[256] = {0};
    /* internal node queue: weight + member bitmap */
    static uint64_t nodes_w[256];
    static uint8_t nodes_mem[256][256];
    int head = 0, tail = 0, leaf = 0;
    for (int step = 0; step < m - 1; step++) {
        uint64_t w[2];
        uint8_t mem[2][256];
        for (int k = 0; k < 2; k++) {
            int take_leaf;
            if (leaf >= m) take_leaf = 0;
            else if (head >= tail) take_leaf = 1;
            else take_leaf = cnt[sym[leaf]] <= nodes_w[head];
            memset(mem[k], 0, 256);
            if (take_leaf) {
                w[k] = cnt[sym[leaf]];
                mem[k][sym[leaf]] = 1;
                leaf++;
            } else {
                w[k] = nodes_w[head];
                memcpy(mem[k], nodes_mem[head], 256);
                head++;
            }
        }
        nodes_w[tail] = w[0] + w[1];
        for (int s = 0; s < 256; s++) {
            nodes_mem[tail][s] = mem[0][s] | mem[1][s];
            if (nodes_mem[tail][s]) depth[s]++;
        }
        tail++;
    }
    /* step 3: limit to 11 bits */
    long K = 0;
    for (int s = 0; s < 256; s++)
        if (cnt[s]) {
            len[s] = (uint8_t)(depth[s] > 11 ? 11 : depth[s]);
            K += 1L << (11 - len[s]);
        }
    while (K > 2048) {
        int b = -1;
        for (int s = 0; s < 256; s++) {
            if (!cnt[s] || len[s] >= 11) continue;
            if (b < 0 || len[s] > len[b] || (len[s] == len[b] && cnt[s] < cnt[b]) ||
                (len[s] == len[b] && cnt[s] == cnt[b] && s > b))
                b = s;
        }
        len[b]++;
        K -= 1L << (11 - len[b]);
    }
    while (K < 2048) {
        int b = -1;
        for (int s = 0; s < 256; s++) {
            if (!cnt[s] || len[s] <= 1 || (1L << (11 - len[s])) > 2048 - K) continue;
            if (b < 0 || cnt[s] > cnt[b] || (cnt[s] == cnt[b] && s < b)) b = s;
        }
        if (b < 0) break;
        K += 1L << (11 - len[b]);
        len[b]--;
    }
    return m;
}

/* canonical codes from lengths, by sorting (length, symbol) */
static void ref_codes(const uint8_t len[256], uint32_t code[256])
{
    int order[256], m = 0;
    for (int s = 0; s < 256; s++) code[s] = 0;
    for (int l = 1; l <= 15; l++)
        for (int s = 0; s < 256; s++)
            if (len[s] == l) order[m++] = s;
    uint32_t c = 0;
    for (int i = 0; i < m; i++) {
        if (i == 0) c = 0;
        else c = (c + 1) << (len[order[i]] - len[order[i - 1]]);
        code[order[i]] = c;
    }
}

/* the whole stream, bit by bit; returns its size */
static size_t ref_encode(const uint8_t *src, size_t n, const uint8_t len[256], uint8_t *out, size_t cap)
{
    uint32_t code[256];
    ref_codes(len, code);
    memset(out, 0, cap);
    for (int j = 0; j < 128; j++) out[j] = (uint8_t)(len[2 * j] | (len[2 * j + 1] << 4));
    size_t q = (n + 3) / 4, pos = 140;
    for (int j = 0; j < 4; j++) {
        size_t a = (size_t)j * q, b = (size_t)(j + 1) * q;
        if (a > n) a = n;
        if (b > n) b = n;
        uint64_t bit = 0;
        for (size_t i = a; i < b; i++)
            for (int k = len[src[i]] - 1; k >= 0; k--) {
                if ((code[src[i]] >> k) & 1) out[pos + bit / 8] |= (uint8_t)(1u << (bit % 8));
                bit++;
            }
        size_t bytes = (size_t)((bit + 7) / 8);
        if (j < 3) {
            out[128 + 4 * j] = (uint8_t)bytes;
            out[129 + 4 * j] = (uint8_t)(bytes >> 8);
            out[130 + 4 * j] = (uint8_t)(bytes >> 16);
            out[131 + 4 * j] = (uint8_t)(bytes >> 24);
        }
        pos += bytes;
    }
    return pos;
}

static int kraft_ok(const uint8_t len[256], int *maxlen)
{
    long K = 0;
    int present = 0;
    *maxlen = 0;
    for (int s = 0; s < 256; s++)
        if (len[s]) {
            if (len[s] > 11) return 0;
            if (len[s] > *maxlen) *maxlen = len[s];
            K += 1L << (11 - len[s]);
            present++;
        }
    return present >= 2 && K == 2048;
}

/* ------------------------------------------------------------------------------ Huffman */
/* Full check of one input: counts, lengths vs reference, size, byte-exact stream vs reference
 * encoder, decode into an exact-size buffer. */
static void huf_roundtrip(const uint8_t *src, size_t n)
{
    uint64_t counts[256], naive[256] = {0};
    uint8_t lens[256], rlens[256];
    ts_huf_count(src, n, counts);
    for (size_t i = 0; i < n; i++) naive[src[i]]++;
    CHECK_MEM(counts, naive, sizeof naive);
    int distinct = ts_huf_lengths(counts, lens);
    int rdistinct = ref_lengths(counts, rlens);
    CHECK(distinct == rdistinct);
    size_t cap = n + 4096;
    uint8_t *enc = tst_xmalloc(cap), *ref = tst_xmalloc(cap);
    size_t out = 0;
    if (distinct < 2) {
        CHECK_ST(ts_huf_encode(src, n, enc, cap, (size_t)-1, &out), TS_E_ARG);
        free(enc);
        free(ref);
        return;
    }
    CHECK_MEM(lens, rlens, 256);
    int maxlen;
    CHECK(kraft_ok(lens, &maxlen));
    uint64_t want = ts_huf_size(src, n, lens);
    size_t rsize = ref_encode(src, n, lens, ref, cap);
    CHECK_U64(want, rsize);
    /* limit exactly the size: ok; one less: TS_E_LIMIT and nothing written */
    CHECK_ST(ts_huf_encode(src, n, enc, (size_t)want + TS_HUF_SLACK, (size_t)want - 1, &out), TS_E_LIMIT);
    CHECK_ST(ts_huf_encode(src, n, enc, (size_t)want + TS_HUF_SLACK - 1, (size_t)-1, &out), TS_E_ARG);
    /* encode into a buffer of exactly size + slack so ASan sees any write past it */
    uint8_t *exact = tst_xmalloc((size_t)want + TS_HUF_SLACK);
    out = 0;
    CHECK_ST(ts_huf_encode(src, n, exact, (size_t)want + TS_HUF_SLACK, (size_t)want, &out), TS_OK);
    CHECK_U64(out, want);
    CHECK_MEM(exact, ref, rsize);
    /* decode from an exact-size copy into an exact-size destination */
    uint8_t *stream = tst_xmalloc(out), *dec = tst_xmalloc(n);
    memcpy(stream, exact, out);
    CHECK_ST(ts_huf_decode(stream, out, dec, n), TS_OK);
    CHECK_MEM(dec, src, n);
    free(stream);
    free(dec);
    free(exact);
    free(enc);
    free(ref);
}

static void test_huf_count(void)
{
    for (size_t n = 0; n < 40; n++) {
        uint8_t buf[40];
        tst_fill_random(buf, n);
        uint64_t c[256], naive[256] = {0};
        for (size_t i = 0; i < n; i++) naive[buf[i]]++;
        ts_huf_count(buf, n, c);
        CHECK_MEM(c, naive, sizeof c);
    }
    uint64_t c[256];
    memset(c, 0xAB, sizeof c);
    ts_huf_count(NULL, 0, c);
    for (int s = 0; s < 256; s++) CHECK_U64(c[s], 0);
}

static void test_huf_lengths_basic(void)
{
    uint64_t c[256] = {0};
    uint8_t l[256];
    CHECK(ts_huf_lengths(c, l) == 0);
    c[7] = 100;
    CHECK(ts_huf_lengths(c, l) == 1);
    c[9] = 1;
    CHECK(ts_huf_lengths(c, l) == 2);
    CHECK(l[7] == 1 && l[9] == 1);
    /* section 6 example: counts a=2 b=1 c=1 give a=1 b=2 c=2 (leaf wins the tie with node b+c) */
    memset(c, 0, sizeof c);
    c['a'] = 2;
    c['b'] = 1;
    c['c'] = 1;
    CHECK(ts_huf_lengths(c, l) == 3);
    CHECK(l['a'] == 1 && l['b'] == 2 && l['c'] == 2);
    /* all 256 equal: every length 8 */
    for (int s = 0; s < 256; s++) c[s] = 5;
    CHECK(ts_huf_lengths(c, l) == 256);
    for (int s = 0; s < 256; s++) CHECK(l[s] == 8);
    /* huge counts (sum near 2^64 must not matter for lengths of two symbols) */
    memset(c, 0, sizeof c);
    c[0] = UINT64_MAX / 2;
    c[255] = UINT64_MAX / 2;
    CHECK(ts_huf_lengths(c, l) == 2);
    CHECK(l[0] == 1 && l[255] == 1);
}

static void test_huf_lengths_vs_reference(void)
{
    for (int iter = 0; iter < 3000; iter++) {
        uint64_t c[256] = {0};
        uint8_t a[256], b[256];
        int kind = iter % 6;
        int nsym = 2 + (int)(tst_rand() % 255);
        for (int k = 0; k < nsym; k++) {
            int s = (int)(tst_rand() % 256);
            switch (kind) {
            case 0: c[s] = 1 + tst_rand() % 10; break;                       /* many ties */
            case 1: c[s] = 1 + tst_rand() % 1000000; break;                  /* random */
            case 2: c[s] = 1ull << (tst_rand() % 40); break;                 /* very skewed */
            case 3: c[s] = (tst_rand() % 3 == 0) ? 1 : 1 + (tst_rand() % 2); break;
            case 4: c[s] = (uint64_t)k * k * k + 1; break;
            default: c[s] = 1ull << (k % 60); break;                         /* forces limiting */
            }
        }
        int x = ts_huf_lengths(c, a), y = ref_lengths(c, b);
        CHECK(x == y);
        if (x >= 2) {
            CHECK_MEM(a, b, 256);
            int maxlen;
            CHECK(kraft_ok(a, &maxlen));
        }
    }
}

static void test_huf_limit_skewed(void)
{
    /* Fibonacci counts: optimal depths reach 23, so the 11-bit limit must kick in */
    enum { NS = 24 };
    uint64_t fib[NS];
    fib[0] = fib[1] = 1;
    for (int i = 2; i < NS; i++) fib[i] = fib[i - 1] + fib[i - 2];
    size_t n = 0;
    for (int i = 0; i < NS; i++) n += (size_t)fib[i];
    uint8_t *src = tst_xmalloc(n);
    size_t k = 0;
    for (int i = 0; i < NS; i++)
        for (uint64_t j = 0; j < fib[i]; j++) src[k++] = (uint8_t)(i * 11 + 3);
    /* shuffle so sub-streams differ */
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)(tst_rand() % (i + 1));
        uint8_t t = src[i];
        src[i] = src[j];
        src[j] = t;
    }
    uint64_t c[256];
    uint8_t l[256];
    ts_huf_count(src, n, c);
    CHECK(ts_huf_lengths(c, l) == NS);
    int maxlen;
    CHECK(kraft_ok(l, &maxlen));
    CHECK(maxlen == 11);
    huf_roundtrip(src, n);
    free(src);
    /* powers of two over 40 symbols: the limit with many symbols pushed to 11 */
    n = 0;
    uint64_t cnt[40];
    for (int i = 0; i < 40; i++) cnt[i] = (i < 20) ? (1ull << (i / 2)) : (1ull << 10) + (uint64_t)i;
    for (int i = 0; i < 40; i++) n += (size_t)cnt[i];
    src = tst_xmalloc(n);
    k = 0;
    for (int i = 0; i < 40; i++)
        for (uint64_t j = 0; j < cnt[i]; j++) src[k++] = (uint8_t)(255 - i);
    huf_roundtrip(src, n);
    free(src);
}

static void test_huf_roundtrip_small_n(void)
{
    for (size_t n = 1; n <= 50; n++) {
        uint8_t buf[50];
        for (int variant = 0; variant < 6; variant++) {
            for (size_t i = 0; i < n; i++) {
                switch (variant) {
                case 0: buf[i] = (uint8_t)tst_rand(); break;
                case 1: buf[i] = (uint8_t)(tst_rand() % 2 ? 'x' : 'y'); break;
                case 2: buf[i] = (uint8_t)(tst_rand() % 7 == 0 ? tst_rand() : 0); break;
                case 3: buf[i] = (uint8_t)i; break;
                case 4: buf[i] = (uint8_t)(i == n - 1 ? 1 : 0); break;       /* one rare symbol last */
                default: buf[i] = (uint8_t)(i == 0 ? 200 : 100); break;       /* one rare symbol first */
                }
            }
            huf_roundtrip(buf, n);
        }
    }
}

static void test_huf_roundtrip_distributions(void)
{
    size_t sizes[] = {51, 64, 100, 255, 1000, 4097, 65536, 65537, 1u << 20};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        size_t n = sizes[si];
        uint8_t *buf = tst_xmalloc(n);
        for (int variant = 0; variant < 5; variant++) {
            for (size_t i = 0; i < n; i++) {
                uint64_t r = tst_rand();
                switch (variant) {
                case 0: buf[i] = (uint8_t)r; break;                                 /* uniform */
                case 1: buf[i] = (uint8_t)(__builtin_ctzll(r | (1ull << 63)));  break; /* geometric */
                case 2: buf[i] = (uint8_t)((r & 1) ? 0x3F : 0x40); break;            /* 2 symbols */
                case 3: buf[i] = (uint8_t)(i % 256); break;                         /* all 256 */
                default: buf[i] = (uint8_t)(120 + (int)(r % 5) - (int)((r >> 8) % 5)); break;
                }
            }
            huf_roundtrip(buf, n);
        }
        free(buf);
    }
}

/* format.md section 6 example: a=1, b=2, c=2 -> a=0, b=10, c=11; "b a c" -> 0x19 */
static void example_header(uint8_t *s, uint32_t s0, uint32_t s1, uint32_t s2)
{
    memset(s, 0, 140);
    s['a' / 2] |= (uint8_t)(1 << 4); /* 'a' = 97, odd: high nibble of byte 48 */
    s['b' / 2] |= 2;                 /* 'b' = 98, even: low nibble of byte 49 */
    s['c' / 2] |= (uint8_t)(2 << 4); /* 'c' = 99, odd: high nibble of byte 49 */
    uint32_t sz[3] = {s0, s1, s2};
    for (int j = 0; j < 3; j++)
        for (int k = 0; k < 4; k++) s[128 + 4 * j + k] = (uint8_t)(sz[j] >> (8 * k));
}

static void test_huf_worked_example(void)
{
    uint8_t s[160], out[16];
    example_header(s, 1, 1, 1);
    CHECK(s[48] == 0x10 && s[49] == 0x22);
    /* n = 12: q = 3, every sub-stream codes "bac" = 0x19 */
    s[140] = s[141] = s[142] = s[143] = 0x19;
    uint8_t *exact = tst_xmalloc(144), *dst = tst_xmalloc(12);
    memcpy(exact, s, 144);
    CHECK_ST(ts_huf_decode(exact, 144, dst, 12), TS_OK);
    CHECK_MEM(dst, "bacbacbacbac", 12);
    free(exact);
    free(dst);

    /* n = 9: q = 3, streams "bac" "bac" "aaa" and an empty sub-stream 3. The encoder must produce
     * exactly this (counts a=5 b=2 c=2 give the example's lengths). */
    example_header(s, 1, 1, 1);
    s[140] = 0x19;
    s[141] = 0x19;
    s[142] = 0x00;
    CHECK_ST(ts_huf_decode(s, 143, out, 9), TS_OK);
    CHECK_MEM(out, "bacbacaaa", 9);
    uint8_t enc[143 + TS_HUF_SLACK];
    size_t sz = 0;
    CHECK_ST(ts_huf_encode((const uint8_t *)"bacbacaaa", 9, enc, sizeof enc, 1000, &sz), TS_OK);
    CHECK_U64(sz, 143);
    CHECK_MEM(enc, s, 143);

    /* n = 3: q = 1, one symbol per sub-stream: 'b' = 10 -> 0x01, 'a' = 0 -> 0x00, 'c' = 11 -> 0x03 */
    example_header(s, 1, 1, 1);
    s[140] = 0x01;
    s[141] = 0x00;
    s[142] = 0x03;
    CHECK_ST(ts_huf_decode(s, 143, out, 3), TS_OK);
    CHECK_MEM(out, "bac", 3);

    /* n = 0: no symbol, all sub-streams empty */
    example_header(s, 0, 0, 0);
    CHECK_ST(ts_huf_decode(s, 140, out, 0), TS_OK);
}

static void test_huf_decode_rejects(void)
{
    uint8_t s[200], out[64];
    /* valid baseline (n = 9 "bacbacaaa") */
    example_header(s, 1, 1, 1);
    s[140] = 0x19;
    s[141] = 0x19;
    s[142] = 0x00;
    CHECK_ST(ts_huf_decode(s, 143, out, 9), TS_OK);

    /* shorter than the 140-byte header, at every length */
    for (size_t len = 0; len < 140; len++) {
        uint8_t *p = tst_xmalloc(len);
        memcpy(p, s, len);
        CHECK_ST(ts_huf_decode(p, len, out, 9), TS_E_CORRUPT);
        free(p);
    }
    /* incomplete code: a=1, b=2 (Kraft 1536) */
    uint8_t t[200];
    memcpy(t, s, 143);
    t['c' / 2] &= 0x0F;
    CHECK_ST(ts_huf_decode(t, 143, out, 9), TS_E_CORRUPT);
    /* over-subscribed: a=1 b=1 c=2 */
    memcpy(t, s, 143);
    t['b' / 2] = (uint8_t)((t['b' / 2] & 0xF0) | 1);
    CHECK_ST(ts_huf_decode(t, 143, out, 9), TS_E_CORRUPT);
    /* one symbol (a=1 only; also a=0 ... any single symbol) */
    memcpy(t, s, 143);
    t['b' / 2] = 0;
    CHECK_ST(ts_huf_decode(t, 143, out, 9), TS_E_CORRUPT);
    /* no symbol at all */
    memset(t, 0, 143);
    CHECK_ST(ts_huf_decode(t, 143, out, 9), TS_E_CORRUPT);
    /* a length above 11 in either nibble (12..15), rest of the code complete at 11 bits */
    for (int bad = 12; bad <= 15; bad++) {
        for (int hi = 0; hi < 2; hi++) {
            memcpy(t, s, 143);
            t[100] = (uint8_t)(hi ? bad << 4 : bad);
            CHECK_ST(ts_huf_decode(t, 143, out, 9), TS_E_CORRUPT);
        }
    }
    /* 2048 symbols can not exist, but 256 symbols of length 8 are complete; one of 12 breaks it */
    memset(t, 0x88, 128);
    memset(t + 128, 0, 72);
    CHECK_ST(ts_huf_decode(t, 140, out, 0), TS_OK);
    t[5] = 0x8C;
    CHECK_ST(ts_huf_decode(t, 140, out, 0), TS_E_CORRUPT);

    /* truncated sub-streams: sub-stream 0 declared empty while it must code 3 symbols */
    memcpy(t, s, 143);
    t[128] = 0;
    t[132] = 2; /* sub-stream 1 now holds both bytes, sub-stream 3 keeps 0x00 */
    CHECK_ST(ts_huf_decode(t, 143, out, 9), TS_E_CORRUPT);
    /* the last sub-stream cut: n = 12 with 4 sub-streams but only 3 bytes of streams */
    example_header(t, 1, 1, 1);
    t[140] = t[141] = t[142] = 0x19;
    CHECK_ST(ts_huf_decode(t, 143, out, 12), TS_E_CORRUPT);
    /* trailing bytes: an extra byte in sub-stream 3, and in sub-stream 0 */
    memcpy(t, s, 143);
    t[143] = 0;
    CHECK_ST(ts_huf_decode(t, 144, out, 9), TS_E_CORRUPT);
    example_header(t, 2, 1, 1);
    t[140] = 0x19;
    t[141] = 0x00;
    t[142] = 0x19;
    t[143] = 0x00;
    CHECK_ST(ts_huf_decode(t, 144, out, 9), TS_E_CORRUPT);
    /* sub-stream sizes larger than the stream */
    uint32_t bigs[][3] = {{4, 0, 0}, {0, 4, 0}, {0, 0, 4}, {2, 2, 0}, {1, 1, 2}, {0xFFFFFFFFu, 0, 0},
                          {1, 0xFFFFFFFFu, 0}, {1, 1, 0xFFFFFFFFu}, {0x80000000u, 0x80000000u, 0}};
    for (size_t i = 0; i < sizeof bigs / sizeof bigs[0]; i++) {
        example_header(t, bigs[i][0], bigs[i][1], bigs[i][2]);
        t[140] = 0x19;
        t[141] = 0x19;
        t[142] = 0x00;
        CHECK_ST(ts_huf_decode(t, 143, out, 9), TS_E_CORRUPT);
    }

    /* larger streams (fast path): cut the last byte -> truncated; add a byte -> corrupt;
     * move one byte from sub-stream 0 to 1 -> the decode of 0 runs dry. */
    size_t n = 5000;
    uint8_t *src = tst_xmalloc(n);
    for (size_t i = 0; i < n; i++) src[i] = (uint8_t)__builtin_ctzll(tst_rand() | (1ull << 40));
    size_t cap = n + 1024, sz = 0;
    uint8_t *enc = tst_xmalloc(cap), *dec = tst_xmalloc(n);
    CHECK_ST(ts_huf_encode(src, n, enc, cap, cap, &sz), TS_OK);
    CHECK_ST(ts_huf_decode(enc, sz, dec, n), TS_OK);
    CHECK_MEM(dec, src, n);
    uint8_t *cut = tst_xmalloc(sz - 1);
    memcpy(cut, enc, sz - 1);
    CHECK_ST(ts_huf_decode(cut, sz - 1, dec, n), TS_E_CORRUPT);
    free(cut);
    uint8_t *longer = tst_xmalloc(sz + 1);
    memcpy(longer, enc, sz);
    longer[sz] = 0;
    CHECK_ST(ts_huf_decode(longer, sz + 1, dec, n), TS_E_CORRUPT);
    /* sub-stream 0 one byte shorter, sub-stream 1 one byte longer (same total) */
    memcpy(longer, enc, sz);
    uint32_t s0 = (uint32_t)longer[128] | ((uint32_t)longer[129] << 8) | ((uint32_t)longer[130] << 16) |
                  ((uint32_t)longer[131] << 24);
    uint32_t s1 = (uint32_t)longer[132] | ((uint32_t)longer[133] << 8) | ((uint32_t)longer[134] << 16) |
                  ((uint32_t)longer[135] << 24);
    CHECK(s0 > 8 && s1 > 8);
    s0--;
    s1++;
    for (int k = 0; k < 4; k++) {
        longer[128 + k] = (uint8_t)(s0 >> (8 * k));
        longer[132 + k] = (uint8_t)(s1 >> (8 * k));
    }
    CHECK_ST(ts_huf_decode(longer, sz, dec, n), TS_E_CORRUPT);
    /* decoding into fewer symbols than were coded leaves bytes over */
    CHECK_ST(ts_huf_decode(enc, sz, dec, n / 2), TS_E_CORRUPT);
    free(longer);
    free(enc);
    free(dec);
    free(src);
}

/* The multi-symbol fast path (n >= 65536): round trips over skewed distributions of several
 * lengths around the path's boundaries, and every damaged stream is decoded in bounds (ASan) and
 * either rejected or decoded to n bytes. */
static void test_huf_multi_symbol_path(void)
{
    static const size_t sizes[] = {65536, 65537, 65536 + 39, 200003, 1 << 20};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        size_t n = sizes[si];
        uint8_t *src = malloc(n), *enc = malloc(2 * n + 256), *dec = malloc(n);
        for (int dist = 0; dist < 3; dist++) {
            for (size_t i = 0; i < n; i++) {
                uint64_t r = tst_rand();
                src[i] = dist == 0 ? (uint8_t)(120 + __builtin_ctzll(r | (1ull << 12)))    /* ~exponents */
                       : dist == 1 ? (uint8_t)(r % 2)                                    /* 1-bit codes: 7 per lookup */
                                   : (uint8_t)(__builtin_ctzll(r | (1ull << 30)) * 8); /* long tail up to 11 bits */
            }
            size_t size;
            CHECK_ST(ts_huf_encode(src, n, enc, 2 * n + 256, 2 * n, &size), TS_OK);
            memset(dec, 0xAA, n);
            CHECK_ST(ts_huf_decode(enc, size, dec, n), TS_OK);
            CHECK_MEM(src, dec, n);
            for (int k = 0; k < 40; k++) { /* compounding bit flips after the lengths table */
                size_t at = 128 + 12 + (size_t)(tst_rand() % (size - 140));
                enc[at] ^= (uint8_t)(1u << (tst_rand() % 8));
                ts_status st = ts_huf_decode(enc, size, dec, n);
                CHECK(st == TS_OK || st == TS_E_CORRUPT);
            }
        }
        free(src);
        free(enc);
        free(dec);
    }
}

static void test_huf_encode_args(void)
{
    uint8_t dst[300];
    size_t sz = 12345;
    CHECK_ST(ts_huf_encode((const uint8_t *)"", 0, dst, sizeof dst, 1000, &sz), TS_E_ARG);
    CHECK_ST(ts_huf_encode((const uint8_t *)"aaaa", 4, dst, sizeof dst, 1000, &sz), TS_E_ARG);
    CHECK_U64(sz, 12345); /* nothing reported on failure */
    CHECK_ST(ts_huf_encode((const uint8_t *)"ab", 2, dst, sizeof dst, 140, &sz), TS_E_LIMIT);
    CHECK_ST(ts_huf_encode((const uint8_t *)"ab", 2, dst, 142 + TS_HUF_SLACK - 1, 142, &sz), TS_E_ARG);
    CHECK_ST(ts_huf_encode((const uint8_t *)"ab", 2, dst, 142 + TS_HUF_SLACK, 142, &sz), TS_OK);
    CHECK_U64(sz, 142);
    uint8_t out[2];
    CHECK_ST(ts_huf_decode(dst, sz, out, 2), TS_OK);
    CHECK_MEM(out, "ab", 2);
    /* size of the empty input is the bare header */
    uint8_t l[256] = {0};
    CHECK_U64(ts_huf_size(NULL, 0, l), 140);
}

/* ------------------------------------------------------------------------------ planes */
static const unsigned all_dtypes[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};

static void test_dtype_size(void)
{
    static const unsigned want[13] = {0, 4, 2, 2, 8, 1, 1, 2, 4, 8, 1, 1, 1};
    for (unsigned d = 0; d < 13; d++) CHECK_U64(ts_dtype_size(d), want[d]);
    CHECK_U64(ts_dtype_size(13), 0);
    CHECK_U64(ts_dtype_size(255), 0);
    CHECK_U64(ts_dtype_size(256 + 1), 0);
    CHECK_U64(ts_dtype_size(0xFFFFFFFFu), 0);
}

/* the plane byte of element bits x per format.md section 5 */
static uint8_t spec_plane(unsigned dtype, const uint8_t *elem, unsigned p)
{
    unsigned isz = ts_dtype_size(dtype);
    uint64_t x = 0;
    for (unsigned b = 0; b < isz; b++) x |= (uint64_t)elem[b] << (8 * b);
    if (dtype == TS_DT_BFLOAT16) return p == 0 ? (uint8_t)((x >> 7) & 0xFF) : (uint8_t)(((x >> 8) & 0x80) | (x & 0x7F));
    if (dtype == TS_DT_FLOAT32) {
        switch (p) {
        case 0: return (uint8_t)((x >> 23) & 0xFF);
        case 1: return (uint8_t)(((x >> 24) & 0x80) | ((x >> 16) & 0x7F));
        case 2: return (uint8_t)((x >> 8) & 0xFF);
        default: return (uint8_t)(x & 0xFF);
        }
    }
    return elem[isz - 1 - p];
}

static void test_planes_roundtrip_all_dtypes(void)
{
    size_t ns[] = {0, 1, 2, 3, 7, 8, 33, 1000, 65537};
    for (size_t di = 0; di < 12; di++) {
        unsigned dt = all_dtypes[di], isz = ts_dtype_size(dt);
        for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
            size_t n = ns[ni];
            uint8_t *src = tst_xmalloc(n * isz), *back = tst_xmalloc(n * isz);
            uint8_t *planes[8];
            tst_fill_random(src, n * isz);
            for (unsigned p = 0; p < isz; p++) planes[p] = tst_xmalloc(n);
            CHECK_ST(ts_planes_split(dt, src, n, planes), TS_OK);
            int layout_ok = 1;
            for (size_t i = 0; i < n && layout_ok; i++)
                for (unsigned p = 0; p < isz; p++)
                    if (planes[p][i] != spec_plane(dt, src + i * isz, p)) layout_ok = 0;
            CHECK(layout_ok);
            memset(back, 0xCD, n * isz);
            CHECK_ST(ts_planes_merge(dt, (const uint8_t *const *)planes, n, back), TS_OK);
            CHECK_MEM(back, src, n * isz);
            for (unsigned p = 0; p < isz; p++) free(planes[p]);
            free(src);
            free(back);
        }
    }
}

static void test_planes_exact_layouts(void)
{
    /* bfloat16: 1.0 = 0x3F80, -2.0 = 0xC000, 0x7F7F (max), 0x8001 (-tiny), 0xFFFF */
    uint16_t bf[] = {0x3F80, 0xC000, 0x7F7F, 0x8001, 0xFFFF, 0x0000, 0x4049};
    uint8_t want0[] = {0x7F, 0x80, 0xFE, 0x00, 0xFF, 0x00, 0x80};
    uint8_t want1[] = {0x00, 0x80, 0x7F, 0x81, 0xFF, 0x00, 0x49};
    enum { NB = sizeof bf / sizeof bf[0] };
    uint8_t src[2 * NB], e[NB], m[NB], back[2 * NB];
    for (int i = 0; i < NB; i++) {
        src[2 * i] = (uint8_t)bf[i];
        src[2 * i + 1] = (uint8_t)(bf[i] >> 8);
    }
    uint8_t *pl[2] = {e, m};
    CHECK_ST(ts_planes_split(TS_DT_BFLOAT16, src, NB, pl), TS_OK);
    CHECK_MEM(e, want0, NB);
    CHECK_MEM(m, want1, NB);
    CHECK_ST(ts_planes_merge(TS_DT_BFLOAT16, (const uint8_t *const *)pl, NB, back), TS_OK);
    CHECK_MEM(back, src, 2 * NB);

    /* float32: 1.0f = 0x3F800000, -1.5f = 0xBFC00000, 0x12345678, 0x80000001 */
    uint32_t f[] = {0x3F800000u, 0xBFC00000u, 0x12345678u, 0x80000001u, 0x7F800000u};
    uint8_t w[4][5] = {{0x7F, 0x7F, 0x24, 0x00, 0xFF},
                       {0x00, 0xC0, 0x34, 0x80, 0x00},
                       {0x00, 0x00, 0x56, 0x00, 0x00},
                       {0x00, 0x00, 0x78, 0x01, 0x00}};
    uint8_t fs[20], p4[4][5], fb[20];
    for (int i = 0; i < 5; i++)
        for (int b = 0; b < 4; b++) fs[4 * i + b] = (uint8_t)(f[i] >> (8 * b));
    uint8_t *pp[4] = {p4[0], p4[1], p4[2], p4[3]};
    CHECK_ST(ts_planes_split(TS_DT_FLOAT32, fs, 5, pp), TS_OK);
    for (int p = 0; p < 4; p++) CHECK_MEM(p4[p], w[p], 5);
    CHECK_ST(ts_planes_merge(TS_DT_FLOAT32, (const uint8_t *const *)pp, 5, fb), TS_OK);
    CHECK_MEM(fb, fs, 20);

    /* generic: int32 0x11223344 -> planes 11 22 33 44 (most significant byte first) */
    uint8_t i32[4] = {0x44, 0x33, 0x22, 0x11}, q[4][1], ib[4];
    uint8_t *qp[4] = {q[0], q[1], q[2], q[3]};
    CHECK_ST(ts_planes_split(TS_DT_INT32, i32, 1, qp), TS_OK);
    CHECK(q[0][0] == 0x11 && q[1][0] == 0x22 && q[2][0] == 0x33 && q[3][0] == 0x44);
    CHECK_ST(ts_planes_merge(TS_DT_INT32, (const uint8_t *const *)qp, 1, ib), TS_OK);
    CHECK_MEM(ib, i32, 4);
    /* float16 uses the generic order: 0x3C00 (1.0) -> 3C 00 */
    uint8_t h[2] = {0x00, 0x3C}, hp0, hp1;
    uint8_t *hp[2] = {&hp0, &hp1};
    CHECK_ST(ts_planes_split(TS_DT_FLOAT16, h, 1, hp), TS_OK);
    CHECK(hp0 == 0x3C && hp1 == 0x00);
}

static void test_planes_bad_dtype(void)
{
    uint8_t a[16] = {0}, b[16];
    uint8_t *pl[8] = {b, b, b, b, b, b, b, b};
    unsigned bad[] = {0, 13, 14, 255, 0x101, 0xFFFFFFFFu};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_ST(ts_planes_split(bad[i], a, 2, pl), TS_E_DTYPE);
        CHECK_ST(ts_planes_merge(bad[i], (const uint8_t *const *)pl, 2, a), TS_E_DTYPE);
    }
}

static void test_strstatus(void)
{
    for (int s = 0; s <= 17; s++) {
        const char *m = ts_strstatus((ts_status)s);
        CHECK(m && strcmp(m, "unknown status") != 0);
        for (int t = 0; t < s; t++) CHECK(strcmp(m, ts_strstatus((ts_status)t)) != 0);
    }
    CHECK_STR(ts_strstatus(TS_OK), "ok");
    CHECK_STR(ts_strstatus((ts_status)18), "unknown status");
    CHECK_STR(ts_strstatus((ts_status)-1), "unknown status");
}

void suite_huff(void)
{
    RUN(test_huf_count);
    RUN(test_huf_lengths_basic);
    RUN(test_huf_lengths_vs_reference);
    RUN(test_huf_limit_skewed);
    RUN(test_huf_roundtrip_small_n);
    RUN(test_huf_multi_symbol_path);
    RUN(test_huf_roundtrip_distributions);
    RUN(test_huf_worked_example);
    RUN(test_huf_decode_rejects);
    RUN(test_huf_encode_args);
}

void suite_planes(void)
{
    RUN(test_strstatus);
    RUN(test_dtype_size);
    RUN(test_planes_roundtrip_all_dtypes);
    RUN(test_planes_exact_layouts);
    RUN(test_planes_bad_dtype);
}
