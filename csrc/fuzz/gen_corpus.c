/* Writes the committed seed corpora (fuzz/corpus/<target>/) and the reproducer files
 * (test/repro/). Deterministic. Usage: gen_corpus <corpus-dir> <repro-dir>  (make corpus) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../test/tsw_build.h"
#include "../ts_codec.h"
#include "../ts_huff.h"
#include "../ts_rans.h"
#include <zstd.h>

static uint64_t rng = 12345;
static uint8_t rnd(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint8_t)(rng >> 56);
}

static void write_file(const char *dir, const char *name, const uint8_t *p, size_t n)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(p, 1, n, f) != n) || fclose(f)) {
        perror(path);
        exit(1);
    }
}

static uint8_t *data_weights(unsigned dtype, size_t numel)
{
    unsigned isz = ts_dtype_size(dtype);
    uint8_t *d = malloc(numel * isz + 1);
    for (size_t i = 0; i < numel; i++) {
        uint8_t *e = d + i * isz;
        for (unsigned b = 0; b < isz; b++) e[b] = rnd();
        if (dtype == 3) e[1] = (uint8_t)((e[1] & 0x80) | (0x3C + (rnd() % 3)));      /* bf16 exponent band */
        else if (dtype == 1) e[3] = (uint8_t)((e[3] & 0x80) | (0x3C + (rnd() % 3))); /* f32 */
        else if (isz > 1) e[isz - 1] = (uint8_t)(rnd() % 4);
        else e[0] = (uint8_t)(rnd() % 5);
    }
    return d;
}

static void index_seeds(const char *dir)
{
    tb_file f;
    /* 1. no tensor */
    if (tb_build(NULL, 0, &f)) exit(1);
    write_file(dir, "empty.tsw", f.buf, f.size);
    tb_free(&f);

    /* 2. a mix of encodings and codecs */
    uint8_t *a = data_weights(1, 6), *b = data_weights(3, 600), *c = malloc(40), *d = data_weights(7, 48);
    uint8_t *e = malloc(2000), *g = data_weights(5, 300);
    memset(c, 7, 40);
    for (int i = 0; i < 2000; i++) e[i] = rnd() < 13 ? 1 : 0; /* p = 0.95: rans beats 1-bit codes */
    tb_tensor t[6];
    memset(t, 0, sizeof t);
    t[0] = (tb_tensor){.name = "raw.f32", .dtype = 1, .encoding = 0, .ndim = 2, .shape = {2, 3}, .chunk_elems = 4, .data = a};
    t[1] = (tb_tensor){.name = "w.bf16", .dtype = 3, .encoding = 1, .ndim = 1, .shape = {600}, .chunk_elems = 300,
                       .data = b, .mode = TS_MODE_HUFFMAN, .level = 1};
    t[2] = (tb_tensor){.name = "fill.u8", .dtype = 6, .encoding = 1, .ndim = 1, .shape = {40}, .chunk_elems = 16,
                       .data = c, .mode = TS_MODE_HUFFMAN, .level = 1};
    t[3] = (tb_tensor){.name = "z.i16", .dtype = 7, .encoding = 1, .ndim = 2, .shape = {6, 8}, .chunk_elems = 48,
                       .data = d, .mode = TS_MODE_ZSTD, .level = 3};
    t[4] = (tb_tensor){.name = "r.u8", .dtype = 6, .encoding = 1, .ndim = 1, .shape = {2000}, .chunk_elems = 2000,
                       .data = e, .mode = TS_MODE_RANS, .level = 1};
    t[5] = (tb_tensor){.name = "h.i8", .dtype = 5, .encoding = 1, .ndim = 1, .shape = {300}, .chunk_elems = 300,
                       .data = g, .mode = TS_MODE_MAX, .level = 1};
    if (tb_build(t, 6, &f)) exit(1);
    write_file(dir, "mixed.tsw", f.buf, f.size);
    /* 3. the same file cut in the middle of its data (a stream prefix) */
    write_file(dir, "mixed-prefix.tsw", f.buf, f.data_offset + (f.size - f.data_offset) / 2);
    tb_free(&f);

    /* 4. scalar and empty tensors, all dtypes raw */
    tb_tensor u[12];
    uint8_t *ud[12];
    static const char *names[12] = {"d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8", "d9", "d10", "d11", "d12"};
    for (unsigned i = 0; i < 12; i++) {
        memset(&u[i], 0, sizeof u[i]);
        ud[i] = data_weights(i + 1, 3);
        u[i].name = names[i];
        u[i].dtype = i + 1;
        u[i].encoding = i % 2;
        u[i].ndim = i % 3;
        u[i].shape[0] = i % 3 ? 3 : 0;
        u[i].shape[1] = 1;
        if (u[i].ndim == 0) u[i].shape[0] = 0;
        u[i].chunk_elems = 2;
        u[i].data = ud[i];
        u[i].mode = (int)(i % 4);
        u[i].level = 1;
    }
    if (tb_build(u, 12, &f)) exit(1);
    write_file(dir, "dtypes.tsw", f.buf, f.size);
    tb_free(&f);
    for (unsigned i = 0; i < 12; i++) free(ud[i]);
    free(a);
    free(b);
    free(c);
    free(d);
    free(e);
    free(g);
}

static void chunk_seed(const char *dir, const char *name, unsigned dtype, unsigned sel, size_t n, const uint8_t *s,
                       size_t len)
{
    uint8_t *p = malloc(len + 4);
    p[0] = (uint8_t)(dtype - 1);
    p[1] = (uint8_t)sel;
    p[2] = (uint8_t)n;
    p[3] = (uint8_t)(n >> 8);
    memcpy(p + 4, s, len);
    write_file(dir, name, p, len + 4);
    free(p);
}

static void chunk_seeds(const char *dir)
{
    uint8_t plain[600], enc[2048];
    for (size_t i = 0; i < sizeof plain; i++) plain[i] = (uint8_t)(rnd() % 6 == 0 ? rnd() : 0x3C + rnd() % 3);
    size_t sz;
    /* selectors: codec = sel % 6 (0 stored 1 fill 2 zstd 3 huffman 4 rans 5 unknown); bit 3 verify */
    if (ts_huf_encode(plain, 600, enc, sizeof enc, sizeof enc, &sz)) exit(1);
    chunk_seed(dir, "huffman-600", 6, 3 | 8, 600, enc, sz);
    if (ts_huf_encode(plain, 37, enc, sizeof enc, sizeof enc, &sz)) exit(1);
    chunk_seed(dir, "huffman-37-bf16", 3, 3, 37, enc, sz);
    if (ts_rans_encode(plain, 600, enc, sizeof enc, sizeof enc, &sz)) exit(1);
    chunk_seed(dir, "rans-600", 6, 4 | 8, 600, enc, sz);
    if (ts_rans_encode(plain, 9, enc, sizeof enc, sizeof enc, &sz)) exit(1);
    chunk_seed(dir, "rans-9-f32", 1, 4, 9, enc, sz);
    sz = ZSTD_compress(enc, sizeof enc, plain, 600, 3);
    if (ZSTD_isError(sz)) exit(1);
    chunk_seed(dir, "zstd-600", 6, 2 | 8, 600, enc, sz);
    chunk_seed(dir, "stored-64-f64", 4, 0 | 8, 64, plain, 64);
    chunk_seed(dir, "fill-100-i32", 8, 1, 100, plain, 1);
    chunk_seed(dir, "tensor-bf16", 3, 2 | 0x80, 0, plain, 256);
    chunk_seed(dir, "tensor-f32-max", 1, 2 | 0x40, 0, plain, 400);
    chunk_seed(dir, "unknown-codec", 5, 5, 16, plain, 16);

    /* whole-input tensors (bit 7: one chunk) that reach the 11-bit length limit (Fibonacci counts,
     * mode huffman) and a rans win (p = 1/16 two-symbol plane, mode rans) */
    static uint8_t big[4000];
    size_t k = 0;
    unsigned fa = 1, fb = 1;
    /* the 4 selector bytes (5, 0x80, 0, 0) land on the three most frequent symbols */
    static const uint8_t top[3] = {128, 5, 0};
    for (unsigned i = 0; i < 17; i++) {
        uint8_t sym = i >= 14 ? top[i - 14] : (uint8_t)(13 * i + 1);
        for (unsigned r = 0; r < fa && k < sizeof big; r++) big[k++] = sym;
        unsigned t = fa + fb;
        fa = fb;
        fb = t;
    }
    for (size_t i = k - 1; i > 0; i--) { /* shuffle */
        size_t j = ((size_t)rnd() << 8 | rnd()) % (i + 1);
        uint8_t t = big[i];
        big[i] = big[j];
        big[j] = t;
    }
    chunk_seed(dir, "tensor-u8-huffman-limit", 6, 0x80, 0, big, k);
    for (size_t i = 0; i < 3000; i++) big[i] = (uint8_t)((rnd() & 15) == 0);
    chunk_seed(dir, "tensor-u8-rans", 6, 0x83, 0, big, 3000);
}

static void repro(const char *dir)
{
    /* shape (2^48, 2, 0), numel 0, raw float32: invalid by docs/format.md section 3 (the partial product
     * 2^49 exceeds 2^48); the C parser rejects it, the Python fallback parser accepted it */
    tb_tensor t;
    memset(&t, 0, sizeof t);
    t.name = "zero";
    t.dtype = 1;
    t.encoding = 0;
    t.ndim = 3;
    t.shape[0] = 1ull << 48;
    t.shape[1] = 2;
    t.shape[2] = 0;
    t.chunk_elems = 1;
    t.data = (const uint8_t *)"";
    tb_file f;
    if (tb_build(&t, 1, &f)) exit(1);
    write_file(dir, "numel_partial_product.tsw", f.buf, f.size);
    tb_free(&f);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s <corpus-dir> <repro-dir>\n", argv[0]);
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/fuzz_index", argv[1]);
    index_seeds(path);
    snprintf(path, sizeof path, "%s/fuzz_chunk", argv[1]);
    chunk_seeds(path);
    repro(argv[2]);
    return 0;
}
