/* Tests of ts_weights: ts_parse_header / ts_parse_index / ts_get_chunk on files built by hand
 * (tsw_build.c, written from docs/format.md) and on hostile variants of them. */
#include "../ts_codec.h"
#include "../ts_weights.h"
#include "tst.h"
#include "tsw_build.h"

#define ANY UINT32_MAX - 1

typedef struct {
    ts_status st;
    int stage; /* 1: header failed, 2: index failed, 0: both ok */
    ts_parse_error e;
    ts_header h;
    ts_tensor *ts;
    uint8_t *copy; /* the exact-size copy that was parsed (kept for ts_get_chunk) */
} parsed;

static void parsed_free(parsed *p)
{
    free(p->ts);
    free(p->copy);
    p->ts = NULL;
    p->copy = NULL;
}

/* Parse a whole file from an exact-size copy (ASan sees any read past the end). */
static parsed parse_buf(const uint8_t *buf, size_t size)
{
    parsed p;
    memset(&p, 0, sizeof p);
    p.e.tensor = p.e.chunk = 12345;
    p.copy = tst_xmalloc(size);
    if (size) memcpy(p.copy, buf, size);
    p.st = ts_parse_header(p.copy, size, &p.h, &p.e);
    if (p.st) {
        p.stage = 1;
        return p;
    }
    p.ts = tst_xmalloc((size_t)p.h.tensor_count * sizeof(ts_tensor));
    p.st = ts_parse_index(&p.h, p.copy + 64, size - 64, p.ts, &p.e);
    p.stage = p.st ? 2 : 0;
    return p;
}

static void expect_at(const char *file, int line, const uint8_t *buf, size_t size, ts_status st, int stage,
                      uint32_t tensor, uint32_t chunk, const char *field)
{
    parsed p = parse_buf(buf, size);
    tst_checks++;
    if (p.st != st || p.stage != stage) {
        tst_fail(file, line, "parse: status %d (%s) at stage %d, want %d (%s) at stage %d [field %s]", (int)p.st,
                 ts_strstatus(p.st), p.stage, (int)st, ts_strstatus(st), stage,
                 p.st && p.e.field ? p.e.field : "-");
    } else if (st != TS_OK) {
        if (tensor != ANY && p.e.tensor != tensor)
            tst_fail(file, line, "parse error tensor %u, want %u (field %s)", p.e.tensor, tensor, p.e.field);
        if (chunk != ANY && p.e.chunk != chunk)
            tst_fail(file, line, "parse error chunk %u, want %u (field %s)", p.e.chunk, chunk, p.e.field);
        if (field && (!p.e.field || strcmp(p.e.field, field)))
            tst_fail(file, line, "parse error field %s, want %s", p.e.field ? p.e.field : "(null)", field);
    }
    parsed_free(&p);
}

#define NONE UINT32_MAX
#define EXPECT_BUF(buf, size, st, stage, tensor, chunk, field)                                     \
    expect_at(__FILE__, __LINE__, buf, size, st, stage, tensor, chunk, field)
#define EXPECT(f, st, stage, tensor, chunk, field) EXPECT_BUF((f)->buf, (f)->size, st, stage, tensor, chunk, field)

/* --------------------------------------------------------------------------------- samples */
static uint8_t *rand_bytes(size_t n)
{
    uint8_t *p = tst_xmalloc(n);
    tst_fill_random(p, n);
    return p;
}

typedef struct {
    tb_tensor t[TB_MAX_TENSORS];
    uint8_t *data[TB_MAX_TENSORS];
    unsigned n;
} sample;

static void sample_free(sample *s)
{
    for (unsigned i = 0; i < s->n; i++) free(s->data[i]);
}

static void add(sample *s, const char *name, unsigned dtype, unsigned enc, unsigned ndim, const uint64_t *shape,
                uint32_t ce, int mode, int kind)
{
    tb_tensor *t = &s->t[s->n];
    memset(t, 0, sizeof *t);
    t->name = name;
    t->dtype = dtype;
    t->encoding = enc;
    t->ndim = ndim;
    uint64_t numel = 1;
    for (unsigned d = 0; d < ndim; d++) {
        t->shape[d] = shape[d];
        numel *= shape[d];
    }
    t->chunk_elems = ce;
    t->mode = mode;
    t->level = 3;
    size_t bytes = (size_t)numel * ts_dtype_size(dtype);
    uint8_t *d = rand_bytes(bytes);
    if (kind == 1) /* compressible */
        for (size_t i = 0; i < bytes; i++) d[i] = (uint8_t)(i % 2 ? 0x3C + (d[i] & 1) : d[i]);
    if (dtype == TS_DT_BOOL)
        for (size_t i = 0; i < bytes; i++) d[i] &= 1;
    t->data = d;
    s->data[s->n++] = d;
}

static void build_big_sample(sample *s, tb_file *f)
{
    memset(s, 0, sizeof *s);
    add(s, "embed.weight", TS_DT_BFLOAT16, 1, 2, (uint64_t[]){40, 50}, 300, TS_MODE_MAX, 1);
    add(s, "norm", TS_DT_FLOAT32, 0, 2, (uint64_t[]){3, 5}, 4, 0, 0);
    add(s, "empty", TS_DT_INT8, 0, 2, (uint64_t[]){0, 7}, 1, 0, 0);
    add(s, "scalar", TS_DT_INT64, 0, 0, NULL, 1, 0, 0);
    add(s, "big", TS_DT_UINT8, 0, 1, (uint64_t[]){70000}, 65536, 0, 0);
    add(s, "f64", TS_DT_FLOAT64, 1, 1, (uint64_t[]){100}, 7, TS_MODE_ZSTD, 1);
    add(s, "planes64k", TS_DT_UINT8, 1, 1, (uint64_t[]){70000}, 70000, TS_MODE_HUFFMAN, 0); /* stored */
    add(s, "mask", TS_DT_BOOL, 1, 1, (uint64_t[]){1000}, 1000, TS_MODE_HUFFMAN, 0);
    add(s, "planes.empty", TS_DT_FLOAT16, 1, 1, (uint64_t[]){0}, 16, TS_MODE_HUFFMAN, 0);
    add(s, "\xc3\xa9t\xc3\xa9", TS_DT_F8E5M2, 1, 3, (uint64_t[]){2, 3, 5}, 4, TS_MODE_MAX, 1);
    add(s, "raw64k", TS_DT_INT16, 0, 1, (uint64_t[]){32768}, 32768, 0, 0); /* exactly 65536 bytes */
    add(s, "last", TS_DT_INT32, 0, 1, (uint64_t[]){3}, 2, 0, 0);
    CHECK(tb_build(s->t, s->n, f) == 0);
}

/* small file for single-field mutations: raw "a", planes "b", raw "c" */
static void build_small_sample(sample *s, tb_file *f)
{
    memset(s, 0, sizeof *s);
    add(s, "a", TS_DT_FLOAT32, 0, 1, (uint64_t[]){4}, 2, 0, 0);
    add(s, "bb", TS_DT_BFLOAT16, 1, 1, (uint64_t[]){10}, 4, TS_MODE_HUFFMAN, 0);
    add(s, "ccc", TS_DT_UINT8, 0, 1, (uint64_t[]){3}, 3, 0, 0);
    CHECK(tb_build(s->t, s->n, f) == 0);
}

/* decode every tensor of a parsed file through ts_get_chunk + ts_run_jobs and compare */
static void decode_all_and_compare(const parsed *p, const sample *s)
{
    const uint8_t *ix = p->copy + 64;
    for (uint32_t i = 0; i < p->h.tensor_count; i++) {
        const ts_tensor *t = &p->ts[i];
        size_t bytes = (size_t)t->numel * t->itemsize;
        uint8_t *dst = tst_xmalloc(bytes);
        ts_chunk_job *jobs = tst_xmalloc((t->chunk_count + 1) * sizeof *jobs);
        uint8_t **dsts = tst_xmalloc((t->chunk_count + 1) * sizeof *dsts);
        uint64_t off = t->data_offset;
        for (uint32_t k = 0; k < t->chunk_count; k++) {
            ts_chunk c;
            ts_get_chunk(ix, t, k, off, &c);
            CHECK_U64(c.offset, off);
            CHECK(c.offset + c.size <= p->h.file_size);
            ts_chunk_job *j = &jobs[k];
            memset(j, 0, sizeof *j);
            j->src = p->copy + c.offset;
            j->src_size = c.size;
            dsts[k] = tst_xmalloc((size_t)c.n_elems * t->itemsize); /* exact */
            j->dst = dsts[k];
            j->n_elems = c.n_elems;
            j->checksum = c.checksum;
            j->dtype = t->dtype;
            j->encoding = t->encoding;
            j->verify = 1;
            memcpy(j->codecs, c.codecs, sizeof j->codecs);
            memcpy(j->plane_sizes, c.plane_sizes, sizeof j->plane_sizes);
            off += c.size;
        }
        CHECK_U64(off, t->data_offset + t->data_size);
        size_t failed = 0;
        CHECK_ST(ts_run_jobs(jobs, t->chunk_count, 3, &failed, NULL), TS_OK);
        size_t at = 0;
        for (uint32_t k = 0; k < t->chunk_count; k++) {
            size_t nb = (size_t)jobs[k].n_elems * t->itemsize;
            memcpy(dst + at, dsts[k], nb);
            at += nb;
            free(dsts[k]);
        }
        CHECK_U64(at, bytes);
        if (s) CHECK_MEM(dst, s->t[i].data, bytes);
        free(dst);
        free(dsts);
        free(jobs);
    }
}

/* ------------------------------------------------------------------------------------ tests */
static void test_valid_file(void)
{
    sample s;
    tb_file f;
    build_big_sample(&s, &f);
    parsed p = parse_buf(f.buf, f.size);
    CHECK_ST(p.st, TS_OK);
    if (p.st == TS_OK) {
        CHECK(p.h.major == 1 && p.h.minor == 0);
        CHECK_U64(p.h.tensor_count, s.n);
        CHECK_U64(p.h.index_size, f.index_size);
        CHECK_U64(p.h.data_offset, f.data_offset);
        CHECK_U64(p.h.file_size, f.size);
        for (unsigned i = 0; i < s.n; i++) {
            const ts_tensor *t = &p.ts[i];
            CHECK_U64(t->name_off, f.rec[i].name);
            CHECK_U64(t->name_len, strlen(s.t[i].name));
            CHECK_MEM(p.copy + 64 + t->name_off, s.t[i].name, t->name_len);
            CHECK_U64(t->dtype, s.t[i].dtype);
            CHECK_U64(t->encoding, s.t[i].encoding);
            CHECK_U64(t->ndim, s.t[i].ndim);
            CHECK_U64(t->itemsize, ts_dtype_size(s.t[i].dtype));
            CHECK_MEM(t->shape, s.t[i].shape, 8 * s.t[i].ndim);
            CHECK_U64(t->numel, f.rec[i].numel);
            CHECK_U64(t->data_offset, f.rec[i].file_offset);
            CHECK_U64(t->data_size, f.rec[i].file_size);
            CHECK_U64(t->chunk_elems, s.t[i].chunk_elems);
            CHECK_U64(t->chunk_count, f.rec[i].nchunks);
            CHECK_U64(t->chunks_off, f.rec[i].chunks);
            CHECK_U64(t->chunk_rec_size, f.rec[i].chunk_rec_size);
        }
        /* placement: the 70000-byte raw tensor and the exactly-65536-byte one are page aligned,
         * the planes tensor of 70000 stored bytes is only 64-aligned */
        CHECK(p.ts[4].data_offset % 4096 == 0);
        CHECK(p.ts[10].data_offset % 4096 == 0);
        CHECK(p.ts[6].data_size == 70000 && p.ts[6].data_offset % 4096 != 0);
        CHECK(p.ts[2].numel == 0 && p.ts[2].chunk_count == 0 && p.ts[2].data_size == 0);
        CHECK(p.ts[3].numel == 1 && p.ts[3].ndim == 0);
        decode_all_and_compare(&p, &s);
    }
    parsed_free(&p);
    /* a later minor version is accepted */
    tb_file m;
    tb_copy(&f, &m);
    tb_put16(m.buf + 10, 0xFFFF);
    tb_seal(&m);
    EXPECT(&m, TS_OK, 0, 0, 0, NULL);
    tb_free(&m);
    /* the index may be parsed from a longer buffer; only index_size bytes count */
    p = parse_buf(f.buf, f.size);
    if (p.st == TS_OK) {
        CHECK_ST(ts_parse_index(&p.h, p.copy + 64, (size_t)p.h.index_size, p.ts, NULL), TS_OK);
        CHECK_ST(ts_parse_index(&p.h, p.copy + 64, (size_t)p.h.index_size - 1, p.ts, NULL), TS_E_TRUNCATED);
    }
    parsed_free(&p);
    tb_free(&f);
    sample_free(&s);
}

static void test_empty_file(void)
{
    tb_file f;
    CHECK(tb_build(NULL, 0, &f) == 0);
    CHECK_U64(f.size, 4096);
    EXPECT(&f, TS_OK, 0, 0, 0, NULL);
    /* by hand, for the record */
    uint8_t h[4096] = {0};
    memcpy(h, "TSWEIGHT", 8);
    h[8] = 1;
    tb_put64(h + 24, 4096);
    tb_put64(h + 32, 4096);
    tb_put64(h + 40, ts_xxh3(h, 0));
    tb_seal_header(h);
    CHECK_MEM(h, f.buf, 4096);
    EXPECT_BUF(h, 4096, TS_OK, 0, 0, 0, NULL);
    /* file_size 4097 with no tensor */
    tb_put64(h + 32, 4097);
    tb_seal_header(h);
    EXPECT_BUF(h, 4096, TS_E_LAYOUT, 2, NONE, NONE, "file_size");
    tb_free(&f);
}

static void test_header_hostile(void)
{
    sample s;
    tb_file f, m;
    build_small_sample(&s, &f);
    EXPECT(&f, TS_OK, 0, 0, 0, NULL);
    ts_header h;
    ts_parse_error e;
    for (size_t len = 0; len < 64; len++) {
        uint8_t *p = tst_xmalloc(len);
        memcpy(p, f.buf, len);
        CHECK_ST(ts_parse_header(p, len, &h, &e), TS_E_TRUNCATED);
        free(p);
    }
    CHECK_ST(ts_parse_header(f.buf, 64, &h, NULL), TS_OK); /* err may be NULL */
    /* magic: every byte */
    for (int b = 0; b < 8; b++) {
        tb_copy(&f, &m);
        m.buf[b] ^= 0x20;
        tb_seal(&m);
        EXPECT(&m, TS_E_MAGIC, 1, NONE, NONE, "magic");
        tb_free(&m);
    }
    /* major */
    uint16_t majors[] = {0, 2, 0x100, 0xFFFF};
    for (size_t i = 0; i < 4; i++) {
        tb_copy(&f, &m);
        tb_put16(m.buf + 8, majors[i]);
        tb_seal(&m);
        EXPECT(&m, TS_E_VERSION, 1, NONE, NONE, "major");
        tb_free(&m);
    }
    /* header checksum: flipped, and a field changed without re-sealing */
    tb_copy(&f, &m);
    m.buf[48] ^= 1;
    EXPECT(&m, TS_E_CHECKSUM, 1, NONE, NONE, "header_checksum");
    m.buf[48] ^= 1;
    m.buf[10] = 1; /* minor */
    EXPECT(&m, TS_E_CHECKSUM, 1, NONE, NONE, "header_checksum");
    tb_free(&m);
    /* features (the 1.0 reserved field): an unknown bit in every byte is refused ... */
    for (int b = 56; b < 64; b++) {
        tb_copy(&f, &m);
        m.buf[b] = 0x80;
        tb_seal(&m);
        EXPECT(&m, TS_E_FIELD, 1, NONE, NONE, "features");
        tb_free(&m);
    }
    for (int bit = 3; bit < 64; bit++) {
        tb_copy(&f, &m);
        tb_put64(m.buf + 56, 1ull << bit);
        tb_seal(&m);
        EXPECT(&m, TS_E_FIELD, 1, NONE, NONE, "features");
        tb_free(&m);
    }
    /* ... the known ones are read (bit 2 alone changes nothing in the index) */
    tb_copy(&f, &m);
    tb_put64(m.buf + 56, TS_FEAT_FLOAT16_PLANES);
    tb_seal(&m);
    {
        parsed p = parse_buf(m.buf, m.size);
        CHECK_ST(p.st, TS_OK);
        CHECK_U64(p.h.features, TS_FEAT_FLOAT16_PLANES);
        parsed_free(&p);
    }
    tb_free(&m);
    /* tensor_count */
    uint32_t tcs[] = {65537, 0x80000000u, 0xFFFFFFFFu};
    for (size_t i = 0; i < 3; i++) {
        tb_copy(&f, &m);
        tb_put32(m.buf + 12, tcs[i]);
        tb_seal(&m);
        EXPECT(&m, TS_E_LIMIT, 1, NONE, NONE, "tensor_count");
        tb_free(&m);
    }
    tb_copy(&f, &m);
    tb_put32(m.buf + 12, 65536);
    tb_seal(&m);
    EXPECT(&m, TS_E_TRUNCATED, 2, 3, NONE, "name_len");
    tb_put32(m.buf + 12, 4);
    tb_seal(&m);
    EXPECT(&m, TS_E_TRUNCATED, 2, 3, NONE, "name_len");
    tb_put32(m.buf + 12, 2);
    tb_seal(&m);
    EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "index_size");
    tb_put32(m.buf + 12, 0);
    tb_seal(&m);
    EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "index_size");
    tb_free(&m);
    /* index_size: limits near 2^26, 2^32, 2^63, 2^64 (data_offset kept consistent where it can be) */
    uint64_t iszs[] = {(64ull << 20) + 1, 1ull << 32, (1ull << 32) - 1 + (64ull << 20), 1ull << 63,
                       UINT64_MAX, UINT64_MAX - 63};
    for (size_t i = 0; i < sizeof iszs / sizeof iszs[0]; i++) {
        tb_copy(&f, &m);
        tb_put64(m.buf + 16, iszs[i]);
        tb_put64(m.buf + 24, tb_align_up(64 + (iszs[i] & 0xFFFFFFFFFFull), 4096));
        tb_seal(&m);
        EXPECT(&m, TS_E_LIMIT, 1, NONE, NONE, "index_size");
        tb_free(&m);
    }
    /* index_size at the limit: header fine, index truncated */
    tb_copy(&f, &m);
    tb_put64(m.buf + 16, 64ull << 20);
    tb_put64(m.buf + 24, (64ull << 20) + 4096);
    tb_put64(m.buf + 32, (64ull << 20) + 8192);
    tb_seal(&m);
    EXPECT(&m, TS_E_TRUNCATED, 2, NONE, NONE, "index");
    tb_free(&m);
    /* index_size larger than the bytes given, header otherwise consistent */
    tb_copy(&f, &m);
    tb_put64(m.buf + 16, f.size);
    tb_put64(m.buf + 24, tb_align_up(64 + f.size, 4096));
    tb_put64(m.buf + 32, tb_align_up(64 + f.size, 4096));
    tb_seal(&m);
    EXPECT(&m, TS_E_TRUNCATED, 2, NONE, NONE, "index");
    tb_free(&m);
    /* file_size: limits */
    uint64_t fss[] = {(1ull << 56) + 1, 1ull << 57, 1ull << 63, UINT64_MAX};
    for (size_t i = 0; i < 4; i++) {
        tb_copy(&f, &m);
        tb_put64(m.buf + 32, fss[i]);
        tb_seal(&m);
        EXPECT(&m, TS_E_LIMIT, 1, NONE, NONE, "file_size");
        tb_free(&m);
    }
    /* file_size exactly 2^56: allowed by the header, wrong for the index */
    tb_copy(&f, &m);
    tb_put64(m.buf + 32, 1ull << 56);
    tb_seal(&m);
    EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "file_size");
    tb_free(&m);
    /* data_offset must be align_up(64 + index_size, 4096) */
    uint64_t dos[] = {0, 64, 4095, 4097, 8192, 1ull << 32, UINT64_MAX, UINT64_MAX - 4095};
    for (size_t i = 0; i < sizeof dos / sizeof dos[0]; i++) {
        tb_copy(&f, &m);
        tb_put64(m.buf + 24, dos[i]);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 1, NONE, NONE, "data_offset");
        tb_free(&m);
    }
    /* file_size below data_offset */
    uint64_t small_fs[] = {0, 64, 4095};
    for (size_t i = 0; i < 3; i++) {
        tb_copy(&f, &m);
        tb_put64(m.buf + 32, small_fs[i]);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 1, NONE, NONE, "file_size");
        tb_free(&m);
    }
    /* file_size one more / one less / a page more than the end of the last tensor */
    int64_t deltas[] = {1, -1, 4096, 64};
    const char *fields[] = {"file_size", "data_size", "file_size", "file_size"};
    uint32_t tens[] = {NONE, 2, NONE, NONE};
    for (size_t i = 0; i < 4; i++) {
        tb_copy(&f, &m);
        tb_put64(m.buf + 32, f.size + (uint64_t)deltas[i]);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, tens[i], NONE, fields[i]);
        tb_free(&m);
    }
    /* index checksum */
    tb_copy(&f, &m);
    m.buf[40] ^= 4;
    tb_seal_header(m.buf);
    EXPECT(&m, TS_E_CHECKSUM, 2, NONE, NONE, "index_checksum");
    tb_free(&m);
    tb_copy(&f, &m);
    m.buf[64 + 5] ^= 4; /* an index byte */
    tb_seal_header(m.buf);
    EXPECT(&m, TS_E_CHECKSUM, 2, NONE, NONE, "index_checksum");
    tb_free(&m);
    tb_free(&f);
    sample_free(&s);
}

/* mutate index bytes of a copy of f, re-seal, expect */
#define MUT(setter, off, val, st, tensor, chunk, field)                                            \
    do {                                                                                           \
        tb_file m_;                                                                                \
        tb_copy(&f, &m_);                                                                          \
        setter(tb_index(&m_) + (off), val);                                                        \
        tb_seal(&m_);                                                                              \
        EXPECT(&m_, st, (st) == TS_OK ? 0 : 2, tensor, chunk, field);                              \
        tb_free(&m_);                                                                              \
    } while (0)

static void put8(uint8_t *p, uint8_t v) { *p = v; }

static void test_index_hostile_records(void)
{
    sample s;
    tb_file f;
    build_small_sample(&s, &f);
    EXPECT(&f, TS_OK, 0, 0, 0, NULL);
    const tb_rec *a = &f.rec[0], *b = &f.rec[1], *c = &f.rec[2];
    /* names */
    MUT(tb_put16, b->rec, 0, TS_E_NAME, 1, NONE, "name_len");
    MUT(tb_put16, b->rec, 1025, TS_E_LIMIT, 1, NONE, "name_len");
    MUT(tb_put16, b->rec, 0xFFFF, TS_E_LIMIT, 1, NONE, "name_len");
    MUT(tb_put16, b->rec, 1024, TS_E_TRUNCATED, 1, NONE, "name");
    MUT(put8, b->name, 0, TS_E_NAME, 1, NONE, "name");
    MUT(put8, c->name + 2, 0, TS_E_NAME, 2, NONE, "name");
    /* dtype / encoding / ndim / flags */
    MUT(put8, b->dtype, 0, TS_E_DTYPE, 1, NONE, "dtype");
    MUT(put8, b->dtype, 13, TS_E_DTYPE, 1, NONE, "dtype");
    MUT(put8, b->dtype, 255, TS_E_DTYPE, 1, NONE, "dtype");
    MUT(put8, b->encoding, 2, TS_E_ENCODING, 1, NONE, "encoding");
    MUT(put8, b->encoding, 255, TS_E_ENCODING, 1, NONE, "encoding");
    MUT(put8, b->ndim, 9, TS_E_LIMIT, 1, NONE, "ndim");
    MUT(put8, b->ndim, 255, TS_E_LIMIT, 1, NONE, "ndim");
    MUT(put8, b->flags, 1, TS_E_FIELD, 1, NONE, "flags");
    MUT(put8, b->flags, 0x80, TS_E_FIELD, 1, NONE, "flags");
    /* a raw tensor whose encoding byte says planes: the chunk table no longer fits -> some error */
    /* shape */
    MUT(tb_put64, b->shape, (1ull << 48) + 1, TS_E_LIMIT, 1, NONE, "shape");
    MUT(tb_put64, b->shape, 1ull << 63, TS_E_LIMIT, 1, NONE, "shape");
    MUT(tb_put64, b->shape, UINT64_MAX, TS_E_LIMIT, 1, NONE, "shape");
    MUT(tb_put64, c->shape, 1ull << 48, TS_E_LAYOUT, 2, NONE, "chunk_count"); /* the max dim is fine */
    MUT(tb_put64, b->shape, 13, TS_E_LAYOUT, 1, NONE, "chunk_count");
    MUT(tb_put64, b->shape, 0, TS_E_LAYOUT, 1, NONE, "chunk_count");
    /* chunk_elems */
    MUT(tb_put32, b->chunk_elems, 0, TS_E_LAYOUT, 1, NONE, "chunk_elems");
    MUT(tb_put32, b->chunk_elems, 0xFFFFFFFFu, TS_E_LIMIT, 1, NONE, "chunk_elems");
    MUT(tb_put32, b->chunk_elems, (8u << 20) + 1, TS_E_LIMIT, 1, NONE, "chunk_elems");
    MUT(tb_put32, b->chunk_elems, 8u << 20, TS_E_LAYOUT, 1, NONE, "chunk_count"); /* 16 MiB exactly ok */
    MUT(tb_put32, a->chunk_elems, 4u << 20, TS_E_LAYOUT, 0, NONE, "chunk_count");
    MUT(tb_put32, a->chunk_elems, (4u << 20) + 1, TS_E_LIMIT, 0, NONE, "chunk_elems");
    MUT(tb_put32, c->chunk_elems, 16u << 20, TS_OK, 0, 0, NULL); /* one chunk of 3: valid */
    MUT(tb_put32, c->chunk_elems, (16u << 20) + 1, TS_E_LIMIT, 2, NONE, "chunk_elems");
    /* chunk_count */
    MUT(tb_put32, b->chunk_count, 0xFFFFFFFFu, TS_E_LAYOUT, 1, NONE, "chunk_count");
    MUT(tb_put32, b->chunk_count, 2, TS_E_LAYOUT, 1, NONE, "chunk_count");
    MUT(tb_put32, b->chunk_count, 4, TS_E_LAYOUT, 1, NONE, "chunk_count");
    MUT(tb_put32, a->chunk_count, 0, TS_E_LAYOUT, 0, NONE, "chunk_count");
    /* data_size */
    MUT(tb_put64, a->data_size, 15, TS_E_LAYOUT, 0, NONE, "data_size");
    MUT(tb_put64, a->data_size, 17, TS_E_LAYOUT, 0, NONE, "data_size");
    MUT(tb_put64, a->data_size, UINT64_MAX, TS_E_LAYOUT, 0, NONE, "data_size");
    MUT(tb_put64, a->data_size, 1ull << 56, TS_E_LAYOUT, 0, NONE, "data_size");
    MUT(tb_put64, b->data_size, f.rec[1].file_size + 1, TS_E_LAYOUT, 1, NONE, "data_size");
    MUT(tb_put64, b->data_size, f.rec[1].file_size - 1, TS_E_LAYOUT, 1, NONE, "data_size");
    MUT(tb_put64, b->data_size, UINT64_MAX, TS_E_LAYOUT, 1, NONE, "data_size");
    /* data_offset: misaligned, holes, overlaps, far away */
    uint64_t ao = f.rec[0].file_offset, bo = f.rec[1].file_offset, co = f.rec[2].file_offset;
    CHECK(ao == 4096 && bo % 64 == 0 && co % 64 == 0 && bo > ao && co > bo);
    MUT(tb_put64, a->data_offset, ao + 1, TS_E_LAYOUT, 0, NONE, "data_offset");
    MUT(tb_put64, a->data_offset, ao + 64, TS_E_LAYOUT, 0, NONE, "data_offset");
    MUT(tb_put64, a->data_offset, ao - 64, TS_E_LAYOUT, 0, NONE, "data_offset");
    MUT(tb_put64, a->data_offset, 0, TS_E_LAYOUT, 0, NONE, "data_offset");
    MUT(tb_put64, a->data_offset, 64, TS_E_LAYOUT, 0, NONE, "data_offset");
    MUT(tb_put64, a->data_offset, UINT64_MAX, TS_E_LAYOUT, 0, NONE, "data_offset");
    MUT(tb_put64, a->data_offset, UINT64_MAX - 4095, TS_E_LAYOUT, 0, NONE, "data_offset");
    MUT(tb_put64, b->data_offset, ao, TS_E_LAYOUT, 1, NONE, "data_offset");          /* overlap a */
    MUT(tb_put64, b->data_offset, bo - 64, TS_E_LAYOUT, 1, NONE, "data_offset");
    MUT(tb_put64, b->data_offset, bo + 64, TS_E_LAYOUT, 1, NONE, "data_offset");     /* hole */
    MUT(tb_put64, b->data_offset, bo + 32, TS_E_LAYOUT, 1, NONE, "data_offset");     /* misaligned */
    MUT(tb_put64, c->data_offset, co + 64, TS_E_LAYOUT, 2, NONE, "data_offset");
    MUT(tb_put64, c->data_offset, bo, TS_E_LAYOUT, 2, NONE, "data_offset");
    /* plane records of "bb" (random data: both planes stored in every chunk) */
    size_t r0 = b->chunks, r1 = b->chunks + b->chunk_rec_size, r2 = b->chunks + 2 * b->chunk_rec_size;
    uint8_t *ix = tb_index(&f);
    CHECK(ix[r0] == TS_CODEC_STORED && tb_get32(ix + r0 + 1) == 4 && tb_get32(ix + r2 + 1) == 2);
    MUT(put8, r1, 5, TS_E_CODEC, 1, 1, "codec");
    MUT(put8, r1 + 5, 9, TS_E_CODEC, 1, 1, "codec");
    MUT(put8, r2 + 5, 255, TS_E_CODEC, 1, 2, "codec");
    MUT(tb_put32, r0 + 6, 5, TS_E_LIMIT, 1, 0, "plane_size");
    MUT(tb_put32, r0 + 1, 0xFFFFFFFFu, TS_E_LIMIT, 1, 0, "plane_size");
    MUT(tb_put32, r0 + 1, 0x80000000u, TS_E_LIMIT, 1, 0, "plane_size");
    MUT(tb_put32, r2 + 1, 3, TS_E_LIMIT, 1, 2, "plane_size");
    MUT(tb_put32, r1 + 1, 3, TS_E_LAYOUT, 1, 1, "plane_size");  /* stored, size != n */
    MUT(put8, r1, TS_CODEC_FILL, TS_E_LAYOUT, 1, 1, "plane_size"); /* fill, size 4 */
    MUT(put8, r1, TS_CODEC_ZSTD, TS_OK, 0, 0, NULL);               /* zstd of size n: index-valid */
    MUT(put8, r1, TS_CODEC_HUFFMAN, TS_OK, 0, 0, NULL);
    MUT(put8, r1, TS_CODEC_RANS, TS_OK, 0, 0, NULL);
    {
        tb_file m;
        tb_copy(&f, &m);
        put8(tb_index(&m) + r1, TS_CODEC_ZSTD);
        tb_put32(tb_index(&m) + r1 + 1, 0);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, 1, 1, "plane_size");
        tb_free(&m);
        tb_copy(&f, &m);
        put8(tb_index(&m) + r1, TS_CODEC_FILL);
        tb_put32(tb_index(&m) + r1 + 1, 1);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, 1, NONE, "data_size"); /* sizes no longer add up */
        tb_free(&m);
        /* consistent fill: shrink data_size too, then the following tensor sits at a hole */
        tb_copy(&f, &m);
        put8(tb_index(&m) + r1, TS_CODEC_FILL);
        tb_put32(tb_index(&m) + r1 + 1, 1);
        tb_put64(tb_index(&m) + b->data_size, f.rec[1].file_size - 3);
        tb_seal(&m);
        EXPECT(&m, (f.rec[1].file_offset + f.rec[1].file_size - 3 + 63) / 64 ==
                           (f.rec[1].file_offset + f.rec[1].file_size + 63) / 64
                       ? TS_OK
                       : TS_E_LAYOUT,
               (f.rec[1].file_offset + f.rec[1].file_size - 3 + 63) / 64 ==
                       (f.rec[1].file_offset + f.rec[1].file_size + 63) / 64
                   ? 0
                   : 2,
               ANY, ANY, NULL);
        tb_free(&m);
    }
    /* a raw chunk checksum is not the index's business */
    MUT(tb_put64, a->chunks, 0, TS_OK, 0, 0, NULL);
    /* chunk tables that claim 2^32 - 1 records */
    {
        tb_file m;
        tb_copy(&f, &m);
        tb_put64(tb_index(&m) + c->shape, 0xFFFFFFFFull);
        tb_put32(tb_index(&m) + c->chunk_elems, 1);
        tb_put32(tb_index(&m) + c->chunk_count, 0xFFFFFFFFu);
        tb_seal(&m);
        EXPECT(&m, TS_E_TRUNCATED, 2, 2, NONE, "chunks");
        tb_free(&m);
        tb_copy(&f, &m);
        tb_put64(tb_index(&m) + b->shape, 0xFFFFFFFFull);
        tb_put32(tb_index(&m) + b->chunk_elems, 1);
        tb_put32(tb_index(&m) + b->chunk_count, 0xFFFFFFFFu);
        tb_seal(&m);
        EXPECT(&m, TS_E_TRUNCATED, 2, 1, NONE, "chunks");
        tb_free(&m);
    }
    /* index_size one byte longer (the padding byte after the index) / shorter */
    {
        tb_file m;
        tb_copy(&f, &m);
        tb_put64(m.buf + 16, f.index_size + 1);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "index_size");
        tb_put64(m.buf + 16, f.index_size + 8);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "index_size");
        tb_put64(m.buf + 16, f.index_size - 1);
        tb_seal(&m);
        EXPECT(&m, TS_E_TRUNCATED, 2, 2, NONE, "chunks");
        tb_free(&m);
    }
    /* diagnostics: the reported limit for "data_size" when the tensor starts past file_size */
    {
        tb_file m;
        tb_copy(&f, &m);
        uint64_t end_b = f.rec[1].file_offset + f.rec[1].file_size;
        CHECK(co > end_b);
        tb_put64(m.buf + 32, end_b); /* c (3 bytes) is then placed at co > file_size */
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, 2, NONE, "data_size");
        parsed p = parse_buf(m.buf, m.size);
        KNOWN_BUG(p.st == TS_E_LAYOUT && p.e.limit <= end_b,
                  "PARSE-ERR-LIMIT-WRAP (ts_parse_index reports limit = file_size - data_offset, which wraps "
                  "below zero when data_offset > file_size)");
        parsed_free(&p);
        tb_free(&m);
    }
    tb_free(&f);
    sample_free(&s);
}

static void test_index_truncated_everywhere(void)
{
    sample s;
    tb_file f;
    build_big_sample(&s, &f);
    parsed ok = parse_buf(f.buf, f.size);
    CHECK_ST(ok.st, TS_OK);
    ts_tensor *ts = tst_xmalloc(s.n * sizeof *ts);
    for (uint64_t len = 0; len < f.index_size; len++) {
        /* (a) the index buffer is shorter than index_size */
        uint8_t *ix = tst_xmalloc((size_t)len);
        memcpy(ix, f.buf + 64, (size_t)len);
        ts_parse_error e;
        CHECK_ST(ts_parse_index(&ok.h, ix, (size_t)len, ts, &e), TS_E_TRUNCATED);
        free(ix);
        /* (b) a file whose index was cut at len bytes: header index_size, data_offset and
         * checksums consistent, the records run past the end */
        tb_file m;
        tb_copy(&f, &m);
        tb_put64(m.buf + 16, len);
        tb_put64(m.buf + 24, tb_align_up(64 + len, 4096));
        tb_seal(&m);
        parsed p = parse_buf(m.buf, m.size);
        tst_checks++;
        if (p.st != TS_E_TRUNCATED || p.stage != 2)
            tst_fail(__FILE__, __LINE__, "index cut at %llu: status %s stage %d (field %s)", (unsigned long long)len,
                     ts_strstatus(p.st), p.stage, p.e.field ? p.e.field : "-");
        parsed_free(&p);
        tb_free(&m);
    }
    free(ts);
    parsed_free(&ok);
    tb_free(&f);
    sample_free(&s);
}

static void test_placement(void)
{
    sample s;
    tb_file f;
    memset(&s, 0, sizeof s);
    add(&s, "small", TS_DT_UINT8, 0, 1, (uint64_t[]){10}, 10, 0, 0);
    add(&s, "page", TS_DT_UINT8, 0, 1, (uint64_t[]){65536}, 65536, 0, 0);
    add(&s, "under", TS_DT_UINT8, 0, 1, (uint64_t[]){65535}, 65535, 0, 0);
    add(&s, "tail", TS_DT_INT16, 1, 1, (uint64_t[]){3}, 3, TS_MODE_HUFFMAN, 0);
    CHECK(tb_build(s.t, s.n, &f) == 0);
    CHECK_U64(f.rec[0].file_offset, 4096);
    CHECK_U64(f.rec[1].file_offset, 8192);
    CHECK_U64(f.rec[2].file_offset, 8192 + 65536);
    CHECK_U64(f.rec[3].file_offset, tb_align_up(8192 + 65536 + 65535, 64));
    EXPECT(&f, TS_OK, 0, 0, 0, NULL);
    const tb_rec *page = &f.rec[1], *under = &f.rec[2];
    /* the page-aligned tensor placed on a 64 boundary only */
    MUT(tb_put64, page->data_offset, 4096 + 64, TS_E_LAYOUT, 1, NONE, "data_offset");
    MUT(tb_put64, page->data_offset, 8192 + 4096, TS_E_LAYOUT, 1, NONE, "data_offset");
    MUT(tb_put64, under->data_offset, 8192 + 65536 + 4096, TS_E_LAYOUT, 2, NONE, "data_offset");
    /* shrink "page" to 65535 bytes by hand: now 64-alignment applies and 8192 is a hole */
    {
        tb_file m;
        tb_copy(&f, &m);
        tb_put64(tb_index(&m) + page->shape, 65535);
        tb_put32(tb_index(&m) + page->chunk_elems, 65535);
        tb_put64(tb_index(&m) + page->data_size, 65535);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, 1, NONE, "data_offset");
        tb_put64(tb_index(&m) + page->data_offset, 4096 + 64);
        tb_seal(&m);
        EXPECT(&m, TS_E_LAYOUT, 2, 2, NONE, "data_offset"); /* "under" now follows a hole */
        tb_free(&m);
    }
    tb_free(&f);
    sample_free(&s);
}

static void test_dims(void)
{
    sample s;
    tb_file f;
    memset(&s, 0, sizeof s);
    add(&s, "d3", TS_DT_FLOAT32, 0, 3, (uint64_t[]){1, 1, 0}, 5, 0, 0);
    add(&s, "d8", TS_DT_INT8, 0, 8, (uint64_t[]){1, 2, 1, 2, 1, 2, 1, 2}, 5, 0, 0);
    CHECK(tb_build(s.t, s.n, &f) == 0);
    EXPECT(&f, TS_OK, 0, 0, 0, NULL);
    size_t sh = f.rec[0].shape;
    struct {
        uint64_t d[3];
        ts_status st;
        const char *field;
    } cases[] = {
        {{1ull << 24, 1ull << 24, 2}, TS_E_LIMIT, "numel"},         /* 2^49 */
        {{1ull << 24, 1ull << 24, 1}, TS_E_LAYOUT, "chunk_count"},  /* 2^48: allowed numel */
        {{1ull << 48, 1ull << 48, 0}, TS_E_LIMIT, "numel"},         /* 2^96 overflows 2^64 */
        {{1ull << 40, 1ull << 40, 1}, TS_E_LIMIT, "numel"},
        {{0xFFFFFFFFull, 0xFFFFFFFFull, 0xFFFFFFFFull}, TS_E_LIMIT, "numel"},
        {{0, 1ull << 48, 1ull << 48}, TS_E_LIMIT, "numel"},        /* empty, but its extent is 2^96 */
        {{0, 1ull << 24, 1ull << 24}, TS_OK, NULL},                /* empty, extent 2^48 */
        {{0, 0, (1ull << 48) + 1}, TS_E_LIMIT, "shape"},
        {{1, UINT64_MAX, 0}, TS_E_LIMIT, "shape"},
        {{1ull << 48, 1, 1}, TS_E_LAYOUT, "chunk_count"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tb_file m;
        tb_copy(&f, &m);
        for (int d = 0; d < 3; d++) tb_put64(tb_index(&m) + sh + 8 * d, cases[i].d[d]);
        tb_seal(&m);
        EXPECT(&m, cases[i].st, cases[i].st ? 2 : 0, cases[i].st ? 0 : ANY, ANY, cases[i].field);
        tb_free(&m);
    }
    /* format.md 3: the extent (product with zeros counted as 1) must be <= 2^48, so (2^48, 2, 0)
     * is invalid although its numel is 0 (test/repro/numel_partial_product.tsw), and so is
     * (0, 2^31, 2^32), whose strides would overflow (tests/corpus/findings: F-A) */
    {
        tb_file m;
        tb_copy(&f, &m);
        uint64_t d[3] = {1ull << 48, 2, 0};
        for (int k = 0; k < 3; k++) tb_put64(tb_index(&m) + sh + 8 * k, d[k]);
        tb_seal(&m);
        EXPECT(&m, TS_E_LIMIT, 2, 0, NONE, "numel");
        d[0] = 1ull << 47; /* (2^47, 2, 0): extent 2^48 */
        tb_put64(tb_index(&m) + sh, d[0]);
        tb_seal(&m);
        EXPECT(&m, TS_OK, 0, 0, 0, NULL);
        uint64_t z[3] = {0, 1ull << 31, 1ull << 32};
        for (int k = 0; k < 3; k++) tb_put64(tb_index(&m) + sh + 8 * k, z[k]);
        tb_seal(&m);
        EXPECT(&m, TS_E_LIMIT, 2, 0, NONE, "numel");
        tb_free(&m);
    }
    /* ndim 8 is the maximum; ndim 9 is rejected before the shape is read */
    MUT(put8, f.rec[1].ndim, 9, TS_E_LIMIT, 1, NONE, "ndim");
    tb_free(&f);
    sample_free(&s);
}

static void test_get_chunk(void)
{
    sample s;
    tb_file f;
    memset(&s, 0, sizeof s);
    add(&s, "p", TS_DT_FLOAT64, 1, 1, (uint64_t[]){10}, 4, TS_MODE_MAX, 1);
    add(&s, "r", TS_DT_INT16, 0, 1, (uint64_t[]){5}, 2, 0, 0);
    CHECK(tb_build(s.t, s.n, &f) == 0);
    parsed p = parse_buf(f.buf, f.size);
    CHECK_ST(p.st, TS_OK);
    if (p.st == TS_OK) {
        const uint8_t *ix = p.copy + 64;
        /* planes: compare against the raw record bytes */
        uint64_t off = p.ts[0].data_offset;
        uint64_t ns[3] = {4, 4, 2};
        for (uint32_t k = 0; k < 3; k++) {
            ts_chunk c;
            memset(&c, 0xFF, sizeof c);
            ts_get_chunk(ix, &p.ts[0], k, off, &c);
            const uint8_t *r = ix + f.rec[0].chunks + k * f.rec[0].chunk_rec_size;
            uint64_t sum = 0;
            for (int pl = 0; pl < 8; pl++) {
                CHECK_U64(c.codecs[pl], r[5 * pl]);
                CHECK_U64(c.plane_sizes[pl], tb_get32(r + 5 * pl + 1));
                sum += c.plane_sizes[pl];
            }
            CHECK_U64(c.size, sum);
            CHECK_U64(c.checksum, tb_get64(r + 40));
            CHECK_U64(c.checksum, ts_xxh3(p.copy + off, (size_t)c.size));
            CHECK_U64(c.n_elems, ns[k]);
            CHECK_U64(c.offset, off);
            off += c.size;
        }
        /* raw: n = 2, 2, 1; size = n * 2; no codecs */
        off = p.ts[1].data_offset;
        uint64_t rn[3] = {2, 2, 1};
        for (uint32_t k = 0; k < 3; k++) {
            ts_chunk c;
            memset(&c, 0xFF, sizeof c);
            ts_get_chunk(ix, &p.ts[1], k, off, &c);
            CHECK_U64(c.n_elems, rn[k]);
            CHECK_U64(c.size, rn[k] * 2);
            CHECK_U64(c.checksum, ts_xxh3(s.t[1].data + 4 * k, (size_t)rn[k] * 2));
            for (int pl = 0; pl < 8; pl++) CHECK(c.codecs[pl] == 0 && c.plane_sizes[pl] == 0);
            off += c.size;
        }
    }
    parsed_free(&p);
    tb_free(&f);
    sample_free(&s);
}

/* Format 1.1, feature bit 1: extension records after the last tensor record, inside the index.
 * Built from a raw-only file (its records do not change with bit 0) by appending records to the
 * index, in the zero padding before data_offset. */
static void with_ext(const tb_file *f, uint64_t features, const uint8_t *ext, size_t n, tb_file *m)
{
    tb_copy(f, m);
    memcpy(m->buf + 64 + f->index_size, ext, n);
    tb_put64(m->buf + 16, f->index_size + n);
    tb_put64(m->buf + 56, features);
    tb_seal(m);
}

static void test_extension_records(void)
{
    sample s;
    tb_file f, m;
    memset(&s, 0, sizeof s);
    add(&s, "r", TS_DT_INT16, 0, 1, (uint64_t[]){5}, 2, 0, 0);
    add(&s, "q", TS_DT_UINT8, 0, 1, (uint64_t[]){9}, 4, 0, 0);
    CHECK(tb_build(s.t, s.n, &f) == 0);
    const uint64_t X = TS_FEAT_EXTENSIONS | TS_FEAT_DECODED_CHECKSUMS;
    /* two records, unknown tags, one empty: valid, and the tensors read as before */
    const uint8_t two[] = {7, 0, 3, 0, 0, 0, 'a', 'b', 'c', 0x2C, 0x01, 0, 0, 0, 0};
    with_ext(&f, X, two, sizeof two, &m);
    {
        parsed p = parse_buf(m.buf, m.size);
        CHECK_ST(p.st, TS_OK);
        if (p.st == TS_OK) CHECK(p.ts[1].numel == 9 && p.ts[0].chunk_count == 3 && p.h.features == X);
        parsed_free(&p);
    }
    tb_free(&m);
    /* the same bytes without bit 1 are left over in the index */
    with_ext(&f, TS_FEAT_DECODED_CHECKSUMS, two, sizeof two, &m);
    EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "index_size");
    tb_free(&m);
    /* tag 0; tags not strictly ascending */
    const uint8_t tag0[] = {0, 0, 1, 0, 0, 0, 'x'};
    with_ext(&f, X, tag0, sizeof tag0, &m);
    EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "extension tag");
    tb_free(&m);
    const uint8_t same[] = {9, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0};
    with_ext(&f, X, same, sizeof same, &m);
    EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "extension tag");
    tb_free(&m);
    const uint8_t down[] = {9, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0};
    with_ext(&f, X, down, sizeof down, &m);
    EXPECT(&m, TS_E_LAYOUT, 2, NONE, NONE, "extension tag");
    tb_free(&m);
    /* a length past the index (also near 2^32), a record header cut short */
    const uint8_t longer[] = {5, 0, 4, 0, 0, 0, 'a', 'b', 'c'};
    with_ext(&f, X, longer, sizeof longer, &m);
    EXPECT(&m, TS_E_TRUNCATED, 2, NONE, NONE, "extension length");
    tb_free(&m);
    const uint8_t huge[] = {5, 0, 0xFF, 0xFF, 0xFF, 0xFF, 'a'};
    with_ext(&f, X, huge, sizeof huge, &m);
    EXPECT(&m, TS_E_TRUNCATED, 2, NONE, NONE, "extension length");
    tb_free(&m);
    const uint8_t cut[] = {5, 0, 0, 0, 0, 0, 6, 0, 1};
    with_ext(&f, X, cut, sizeof cut, &m);
    EXPECT(&m, TS_E_TRUNCATED, 2, NONE, NONE, "extension record");
    tb_free(&m);
    tb_free(&f);
    sample_free(&s);
}

void suite_weights(void)
{
    RUN(test_valid_file);
    RUN(test_empty_file);
    RUN(test_header_hostile);
    RUN(test_index_hostile_records);
    RUN(test_index_truncated_everywhere);
    RUN(test_placement);
    RUN(test_dims);
    RUN(test_get_chunk);
    RUN(test_extension_records);
}
