/* Tests of ts_codec: xxh3, ts_encode_planes, ts_checksum_chunks, ts_run_job(s). */
#include <zstd.h>

#include "../ts_codec.h"
#include "../ts_huff.h"
#include "../ts_rans.h"
#include "tst.h"

/* ---------------------------------------------------------------------------------- helpers */
typedef struct {
    unsigned dtype, isz;
    uint64_t numel, chunk_elems;
    size_t nchunks;
    uint8_t *src;        /* numel * isz */
    uint8_t *enc;        /* encoded chunks back to back */
    uint64_t enc_size;
    ts_chunk_out *chunks;
} encoded;

static ts_status encode(encoded *e, unsigned dtype, const uint8_t *src, uint64_t numel, uint64_t ce, int mode,
                        int level, int threads)
{
    memset(e, 0, sizeof *e);
    e->dtype = dtype;
    e->isz = ts_dtype_size(dtype);
    e->numel = numel;
    e->chunk_elems = ce;
    e->nchunks = (size_t)((numel + ce - 1) / ce);
    e->src = tst_xmalloc((size_t)numel * e->isz);
    if (numel) memcpy(e->src, src, (size_t)numel * e->isz);
    e->enc = tst_xmalloc((size_t)numel * e->isz);
    e->chunks = tst_xmalloc((e->nchunks + 1) * sizeof(ts_chunk_out));
    return ts_encode_planes(dtype, e->src, numel, ce, mode, level, threads, e->enc, &e->enc_size, e->chunks);
}

static void encoded_free(encoded *e)
{
    free(e->src);
    free(e->enc);
    free(e->chunks);
}

static uint64_t chunk_n(const encoded *e, size_t k)
{
    uint64_t first = (uint64_t)k * e->chunk_elems;
    return e->numel - first < e->chunk_elems ? e->numel - first : e->chunk_elems;
}

/* jobs over the encoded chunks, each with an exact-size malloc'd destination */
static ts_chunk_job *make_jobs(const encoded *e, int verify, uint8_t ***dsts_out)
{
    ts_chunk_job *jobs = tst_xmalloc((e->nchunks + 1) * sizeof *jobs);
    uint8_t **dsts = tst_xmalloc((e->nchunks + 1) * sizeof *dsts);
    uint64_t off = 0;
    for (size_t k = 0; k < e->nchunks; k++) {
        ts_chunk_job *j = &jobs[k];
        memset(j, 0, sizeof *j);
        uint64_t n = chunk_n(e, k);
        dsts[k] = tst_xmalloc((size_t)n * e->isz);
        memset(dsts[k], 0xEE, (size_t)n * e->isz);
        j->src = e->enc + off;
        j->src_size = e->chunks[k].size;
        j->dst = dsts[k];
        j->n_elems = n;
        j->checksum = e->chunks[k].checksum;
        j->dtype = (uint8_t)e->dtype;
        j->encoding = TS_ENC_PLANES;
        j->verify = (uint8_t)verify;
        memcpy(j->codecs, e->chunks[k].codecs, sizeof j->codecs);
        memcpy(j->plane_sizes, e->chunks[k].plane_sizes, sizeof j->plane_sizes);
        off += e->chunks[k].size;
    }
    *dsts_out = dsts;
    return jobs;
}

static void free_jobs(ts_chunk_job *jobs, uint8_t **dsts, size_t n)
{
    for (size_t k = 0; k < n; k++) free(dsts[k]);
    free(dsts);
    free(jobs);
}

/* Invariants of an encoding (docs/format.md section 5 + docs/native-api.md), decode check. */
static void check_encoded(const encoded *e, int mode, int threads)
{
    uint64_t off = 0;
    for (size_t k = 0; k < e->nchunks; k++) {
        const ts_chunk_out *c = &e->chunks[k];
        uint64_t n = chunk_n(e, k), sum = 0;
        for (unsigned p = 0; p < e->isz; p++) {
            uint8_t codec = c->codecs[p];
            uint32_t sz = c->plane_sizes[p];
            CHECK(codec <= TS_CODEC_RANS);
            CHECK(sz <= n && sz >= 1);
            if (codec == TS_CODEC_STORED) CHECK(sz == n);
            if (codec == TS_CODEC_FILL) CHECK(sz == 1 && n > 1);
            if (codec == TS_CODEC_ZSTD)
                CHECK((mode == TS_MODE_ZSTD || mode == TS_MODE_MAX || mode == TS_MODE_ZSTD_HUFFMAN) && sz < n);
            if (codec == TS_CODEC_HUFFMAN) CHECK(mode != TS_MODE_ZSTD && sz < n && sz >= TS_HUF_HEADER);
            if (codec == TS_CODEC_RANS) CHECK((mode == TS_MODE_MAX || mode == TS_MODE_RANS) && sz < n);
            sum += sz;
        }
        for (unsigned p = e->isz; p < TS_MAX_PLANES; p++) CHECK(c->codecs[p] == 0 && c->plane_sizes[p] == 0);
        CHECK_U64(c->size, sum);
        CHECK_U64(c->checksum, ts_xxh3(e->enc + off, (size_t)c->size));
        off += c->size;
    }
    CHECK_U64(off, e->enc_size);
    CHECK(e->enc_size <= e->numel * e->isz);
    uint8_t **dsts;
    ts_chunk_job *jobs = make_jobs(e, 1, &dsts);
    size_t failed = 777;
    CHECK_ST(ts_run_jobs(jobs, e->nchunks, threads, &failed, NULL), TS_OK);
    int same = 1;
    for (size_t k = 0; k < e->nchunks; k++)
        if (memcmp(dsts[k], e->src + k * e->chunk_elems * e->isz, (size_t)chunk_n(e, k) * e->isz)) same = 0;
    CHECK(same);
    free_jobs(jobs, dsts, e->nchunks);
}

/* float-like data for a dtype: values near a few magnitudes (compressible exponent plane) */
static void gen_data(unsigned dtype, uint8_t *p, uint64_t numel, int kind)
{
    unsigned isz = ts_dtype_size(dtype);
    for (uint64_t i = 0; i < numel; i++) {
        uint8_t *e = p + i * isz;
        uint64_t r = tst_rand();
        switch (kind) {
        case 0: /* random bytes */
            for (unsigned b = 0; b < isz; b++) e[b] = (uint8_t)(r >> (8 * b));
            break;
        case 1: /* constant */
            for (unsigned b = 0; b < isz; b++) e[b] = (uint8_t)(0xA5 ^ b);
            break;
        case 2: /* "weights": random mantissa, exponent from a narrow set, random sign */
            for (unsigned b = 0; b < isz; b++) e[b] = (uint8_t)(r >> (8 * b));
            if (dtype == TS_DT_BFLOAT16) {
                uint16_t x = (uint16_t)((r & 0x7F) | ((uint16_t)(120 + (r >> 8) % 6) << 7) | ((r >> 20) & 1) << 15);
                e[0] = (uint8_t)x;
                e[1] = (uint8_t)(x >> 8);
            } else if (dtype == TS_DT_FLOAT32) {
                uint32_t x = (uint32_t)(r & 0x7FFFFF) | ((uint32_t)(120 + (r >> 24) % 6) << 23) |
                             (uint32_t)((r >> 40) & 1) << 31;
                memcpy(e, &x, 4);
            } else {
                e[isz - 1] = (uint8_t)(__builtin_ctzll(r | (1ull << 50)) + (isz > 1 ? 0x30 : 0));
            }
            break;
        case 3: /* low entropy bytes everywhere */
            for (unsigned b = 0; b < isz; b++) e[b] = (uint8_t)((r >> (4 * b)) & 3);
            break;
        default: /* two symbols, p = 1/16: rans beats huffman's 1 bit per byte */
            for (unsigned b = 0; b < isz; b++) e[b] = (uint8_t)(((r >> (4 * b)) & 15) == 0);
            break;
        }
    }
}

/* ---------------------------------------------------------------------------------- tests */
static void test_xxh3(void)
{
    CHECK_U64(ts_xxh3("", 0), 0x2D06800538D394C2ull); /* XXH3_64bits of the empty input, seed 0 */
    /* same input, same hash; any flipped bit changes it */
    uint8_t buf[1000];
    tst_fill_random(buf, sizeof buf);
    size_t lens[] = {1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1000};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        uint64_t h = ts_xxh3(buf, lens[i]);
        CHECK_U64(ts_xxh3(buf, lens[i]), h);
        buf[lens[i] - 1] ^= 1;
        CHECK(ts_xxh3(buf, lens[i]) != h);
        buf[lens[i] - 1] ^= 1;
    }
}

static void test_encode_roundtrip(void)
{
    static const unsigned dts[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    static const uint64_t numels[] = {1, 2, 5, 100, 1001, 20000};
    static const uint64_t ces[] = {1, 3, 64, 1000, 4096, 1u << 20};
    for (size_t di = 0; di < 12; di++) {
        for (size_t ni = 0; ni < sizeof numels / sizeof numels[0]; ni++) {
            for (size_t ci = 0; ci < sizeof ces / sizeof ces[0]; ci++) {
                unsigned dt = dts[di];
                uint64_t numel = numels[ni], ce = ces[ci];
                if (numel / ce > 2000) continue; /* keep the run short */
                int kind = (int)((di + ni + ci) % 4);
                uint8_t *src = tst_xmalloc((size_t)numel * ts_dtype_size(dt));
                gen_data(dt, src, numel, kind);
                for (int mode = 0; mode <= TS_MODE_ZSTD_HUFFMAN; mode++) {
                    encoded a, b;
                    CHECK_ST(encode(&a, dt, src, numel, ce, mode, 3, 1), TS_OK);
                    check_encoded(&a, mode, 1);
                    CHECK_ST(encode(&b, dt, src, numel, ce, mode, 3, 4), TS_OK);
                    /* deterministic, independent of threads */
                    CHECK_U64(a.enc_size, b.enc_size);
                    CHECK_MEM(a.enc, b.enc, (size_t)a.enc_size);
                    CHECK_MEM(a.chunks, b.chunks, a.nchunks * sizeof(ts_chunk_out));
                    check_encoded(&b, mode, 4);
                    encoded_free(&a);
                    encoded_free(&b);
                }
                free(src);
            }
        }
    }
}

/* Reference model of the per-plane codec choice (docs/native-api.md, encode_planes): fill when all
 * bytes are equal (n > 1); else the best of stored and the mode's candidates, tried in the order
 * zstd, huffman, rans, each strictly smaller than the best so far, rans at most
 * floor(best * 127 / 128). Sizes come from the public encoders. */
static void ref_choice(int mode, int level, const uint8_t *pl, size_t n, uint8_t *codec, uint32_t *size)
{
    int all_eq = 1;
    for (size_t i = 1; i < n; i++)
        if (pl[i] != pl[0]) all_eq = 0;
    if (all_eq && n > 1) {
        *codec = TS_CODEC_FILL;
        *size = 1;
        return;
    }
    size_t best = n;
    uint8_t bc = TS_CODEC_STORED;
    size_t cap = ZSTD_compressBound(n) + 1024;
    uint8_t *tmp = tst_xmalloc(cap);
    if (mode == TS_MODE_ZSTD || mode == TS_MODE_MAX || mode == TS_MODE_ZSTD_HUFFMAN) {
        size_t z = ZSTD_compress(tmp, cap, pl, n, level);
        if (!ZSTD_isError(z) && z < best) {
            best = z;
            bc = TS_CODEC_ZSTD;
        }
    }
    if (mode != TS_MODE_ZSTD) {
        uint64_t c[256];
        uint8_t l[256];
        ts_huf_count(pl, n, c);
        if (ts_huf_lengths(c, l) >= 2) {
            uint64_t h = ts_huf_size(pl, n, l);
            if (h < best) {
                best = (size_t)h;
                bc = TS_CODEC_HUFFMAN;
            }
        }
    }
    if (mode == TS_MODE_MAX || mode == TS_MODE_RANS) {
        size_t lim = best * 127 / 128, r = 0;
        if (lim > 0 && !all_eq && ts_rans_encode(pl, n, tmp, cap, cap, &r) == TS_OK && r <= lim) {
            best = r;
            bc = TS_CODEC_RANS;
        }
    }
    free(tmp);
    *codec = bc;
    *size = (uint32_t)best;
}

static void test_encode_choice_reference(void)
{
    unsigned dts[] = {TS_DT_BFLOAT16, TS_DT_FLOAT32, TS_DT_INT8, TS_DT_FLOAT64, TS_DT_INT16};
    int seen[5] = {0};
    for (size_t di = 0; di < sizeof dts / sizeof dts[0]; di++) {
        for (int kind = 0; kind < 5; kind++) {
            unsigned isz = ts_dtype_size(dts[di]);
            uint64_t numel = 3001, ce = kind == 4 ? 3001 : 700; /* rans needs n >> its 290-byte header */
            uint8_t *src = tst_xmalloc((size_t)numel * isz);
            gen_data(dts[di], src, numel, kind);
            for (int mode = 0; mode <= TS_MODE_ZSTD_HUFFMAN; mode++) {
                encoded e;
                CHECK_ST(encode(&e, dts[di], src, numel, ce, mode, 5, 2), TS_OK);
                uint8_t *planes[8];
                for (unsigned p = 0; p < isz; p++) planes[p] = tst_xmalloc((size_t)ce);
                int agree = 1;
                for (size_t k = 0; k < e.nchunks; k++) {
                    size_t n = (size_t)chunk_n(&e, k);
                    CHECK_ST(ts_planes_split(dts[di], src + k * ce * isz, n, planes), TS_OK);
                    for (unsigned p = 0; p < isz; p++) {
                        uint8_t c;
                        uint32_t sz;
                        ref_choice(mode, 5, planes[p], n, &c, &sz);
                        seen[c]++;
                        if (c != e.chunks[k].codecs[p] || sz != e.chunks[k].plane_sizes[p]) {
                            if (agree)
                                tst_fail(__FILE__, __LINE__,
                                         "dtype %u kind %d mode %d chunk %zu plane %u: encoder chose codec %u size %u, "
                                         "reference codec %u size %u",
                                         dts[di], kind, mode, k, p, e.chunks[k].codecs[p],
                                         e.chunks[k].plane_sizes[p], c, sz);
                            agree = 0;
                        }
                    }
                }
                tst_checks++;
                for (unsigned p = 0; p < isz; p++) free(planes[p]);
                encoded_free(&e);
            }
            free(src);
        }
    }
    /* the data above exercises every codec */
    for (int c = 0; c < 5; c++) CHECK(seen[c] > 0);
    if (getenv("TS_TEST_VERBOSE")) fprintf(stderr, "codecs seen: %d %d %d %d %d\n", seen[0], seen[1], seen[2], seen[3], seen[4]);
}

static void test_encode_codec_choice(void)
{
    /* constant planes -> fill (n > 1); one element -> stored (fill ties with stored, lower wins) */
    uint8_t src[4 * 64];
    for (int i = 0; i < 64; i++) {
        uint32_t x = 0x3F800000u | (uint32_t)(tst_rand() & 0xFF); /* planes 0,1,2 constant */
        memcpy(src + 4 * i, &x, 4);
    }
    for (int mode = 0; mode <= TS_MODE_ZSTD_HUFFMAN; mode++) {
        encoded e;
        CHECK_ST(encode(&e, TS_DT_FLOAT32, src, 64, 64, mode, 1, 1), TS_OK);
        CHECK(e.nchunks == 1);
        CHECK(e.chunks[0].codecs[0] == TS_CODEC_FILL && e.chunks[0].plane_sizes[0] == 1);
        CHECK(e.chunks[0].codecs[1] == TS_CODEC_FILL && e.chunks[0].codecs[2] == TS_CODEC_FILL);
        CHECK(e.chunks[0].codecs[3] == TS_CODEC_STORED && e.chunks[0].plane_sizes[3] == 64);
        CHECK_U64(e.enc_size, 3 + 64);
        CHECK(e.enc[0] == 0x7F && e.enc[1] == 0x00 && e.enc[2] == 0x00);
        check_encoded(&e, mode, 1);
        encoded_free(&e);
        CHECK_ST(encode(&e, TS_DT_FLOAT32, src, 1, 1, mode, 1, 1), TS_OK);
        for (int p = 0; p < 4; p++) CHECK(e.chunks[0].codecs[p] == TS_CODEC_STORED);
        check_encoded(&e, mode, 1);
        encoded_free(&e);
    }
    /* a long skewed plane: huffman in mode 0, zstd in mode 1 */
    uint64_t n = 50000;
    uint8_t *big = tst_xmalloc(n);
    gen_data(TS_DT_UINT8, big, n, 2);
    encoded e;
    CHECK_ST(encode(&e, TS_DT_UINT8, big, n, n, TS_MODE_HUFFMAN, 1, 1), TS_OK);
    CHECK(e.chunks[0].codecs[0] == TS_CODEC_HUFFMAN);
    encoded_free(&e);
    CHECK_ST(encode(&e, TS_DT_UINT8, big, n, n, TS_MODE_ZSTD, 1, 1), TS_OK);
    CHECK(e.chunks[0].codecs[0] == TS_CODEC_ZSTD);
    encoded_free(&e);
    free(big);
}

static void test_encode_args(void)
{
    uint8_t src[64] = {0}, dst[64];
    ts_chunk_out co[64];
    uint64_t out = 99;
    CHECK_ST(ts_encode_planes(0, src, 4, 4, 0, 1, 1, dst, &out, co), TS_E_DTYPE);
    CHECK_ST(ts_encode_planes(13, src, 4, 4, 0, 1, 1, dst, &out, co), TS_E_DTYPE);
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 4, 0, 0, 1, 1, dst, &out, co), TS_E_ARG);
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 4, 4, 5, 1, 1, dst, &out, co), TS_E_ARG);
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 4, 4, 1000, 1, 1, dst, &out, co), TS_E_ARG);
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 4, 4, TS_MODE_RANS, 1, 1, dst, &out, co), TS_OK);
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 4, 4, -1, 1, 1, dst, &out, co), TS_E_ARG);
    CHECK_ST(ts_encode_planes(TS_DT_FLOAT32, src, 4, (4u << 20) + 1, 0, 1, 1, dst, &out, co), TS_E_ARG);
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 4, (16u << 20) + 1, 0, 1, 1, dst, &out, co), TS_E_ARG);
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 0, 4, 0, 1, 1, dst, &out, co), TS_OK);
    CHECK_U64(out, 0);
    /* 16 MiB of chunk is allowed; a chunk_elems whose byte size wraps 2^64 is not a valid chunk size */
    CHECK_ST(ts_encode_planes(TS_DT_INT8, src, 4, 16u << 20, 0, 1, 1, dst, &out, co), TS_OK);
    KNOWN_BUG(ts_encode_planes(TS_DT_FLOAT32, src, 4, (1ull << 62) + 1, 0, 1, 1, dst, &out, co) == TS_E_ARG,
              "ENC-CHUNK-WRAP (chunk_elems * itemsize wraps in the argument check)");
}

static void test_checksum_chunks(void)
{
    size_t n = 100003;
    uint8_t *src = tst_xmalloc(n);
    tst_fill_random(src, n);
    uint64_t cbs[] = {1, 7, 4096, 65536, 100003, 100004, 1ull << 40};
    for (size_t ci = 0; ci < sizeof cbs / sizeof cbs[0]; ci++) {
        uint64_t cb = cbs[ci];
        if (n / cb > 20000) continue;
        size_t cnt = (size_t)((n + cb - 1) / cb);
        for (int threads = 1; threads <= 4; threads += 3) {
            uint64_t *out = tst_xmalloc(cnt * sizeof *out);
            CHECK_ST(ts_checksum_chunks(src, n, cb, threads, out), TS_OK);
            int ok = 1;
            for (size_t k = 0; k < cnt; k++) {
                uint64_t len = n - k * cb < cb ? n - k * cb : cb;
                if (out[k] != ts_xxh3(src + k * cb, (size_t)len)) ok = 0;
            }
            CHECK(ok);
            free(out);
        }
    }
    uint64_t one = 0;
    CHECK_ST(ts_checksum_chunks(src, n, 0, 1, &one), TS_E_ARG);
    CHECK_ST(ts_checksum_chunks(src, 0, 5, 4, &one), TS_OK);
    /* one slice of 10 bytes whatever chunk_bytes >= 10: UINT64_MAX wraps (n + chunk_bytes - 1) */
    one = 0;
    CHECK_ST(ts_checksum_chunks(src, 10, 1ull << 63, 1, &one), TS_OK);
    CHECK_U64(one, ts_xxh3(src, 10));
    one = 0;
    ts_status st = ts_checksum_chunks(src, 10, UINT64_MAX, 1, &one);
    KNOWN_BUG(st == TS_OK && one == ts_xxh3(src, 10),
              "CKSUM-WRAP (ts_checksum_chunks: chunk_bytes near 2^64 -> 0 slices, out[0] never written)");
    free(src);
}

/* one planes job over a single-plane (uint8) chunk whose only plane is `stream` */
static ts_chunk_job one_plane_job(const uint8_t *stream, uint64_t size, uint8_t codec, uint64_t n, uint8_t *dst)
{
    ts_chunk_job j;
    memset(&j, 0, sizeof j);
    j.src = stream;
    j.src_size = size;
    j.dst = dst;
    j.n_elems = n;
    j.checksum = ts_xxh3(stream, (size_t)size);
    j.dtype = TS_DT_UINT8;
    j.encoding = TS_ENC_PLANES;
    j.verify = 1;
    j.codecs[0] = codec;
    j.plane_sizes[0] = (uint32_t)size;
    return j;
}

static ts_status run1(const ts_chunk_job *j)
{
    size_t failed = 99;
    ts_status st = ts_run_jobs(j, 1, 1, &failed, NULL);
    if (st != TS_OK && failed != 0) return (ts_status)99;
    /* and the single-job entry point agrees */
    unsigned isz = ts_dtype_size(j->dtype);
    size_t scratch = (size_t)j->n_elems * (isz ? isz : 1);
    uint8_t *s = tst_xmalloc(scratch);
    ZSTD_DCtx *d = ZSTD_createDCtx();
    ts_status st2 = ts_run_job(j, s, scratch, d);
    ZSTD_freeDCtx(d);
    free(s);
    if (st2 != st) return (ts_status)98;
    return st;
}

static void test_zstd_plane_rules(void)
{
    enum { N = 300 };
    uint8_t plane[N + 1];
    for (int i = 0; i <= N; i++) plane[i] = (uint8_t)(i % 3);
    uint8_t frame[1024], bad[1024];
    uint8_t *dst = tst_xmalloc(N);
    /* valid frame */
    size_t fs = ZSTD_compress(frame, sizeof frame, plane, N, 3);
    CHECK(!ZSTD_isError(fs) && fs < N);
    ts_chunk_job j = one_plane_job(frame, fs, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_OK);
    CHECK_MEM(dst, plane, N);
    /* frame declares a larger (N + 1) / smaller (N - 1) content size than the plane */
    size_t fl = ZSTD_compress(bad, sizeof bad, plane, N + 1, 3);
    j = one_plane_job(bad, fl, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    fl = ZSTD_compress(bad, sizeof bad, plane, N - 1, 3);
    j = one_plane_job(bad, fl, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    /* frame without a content size */
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0);
    ZSTD_CStream *cs = cc;
    ZSTD_outBuffer ob = {bad, sizeof bad, 0};
    ZSTD_inBuffer ib = {plane, N, 0};
    size_t r = ZSTD_compressStream2(cs, &ob, &ib, ZSTD_e_end);
    CHECK(r == 0);
    CHECK(ZSTD_getFrameContentSize(bad, ob.pos) == ZSTD_CONTENTSIZE_UNKNOWN);
    j = one_plane_job(bad, ob.pos, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    ZSTD_freeCCtx(cc);
    /* a trailing byte after the frame, and the frame cut short */
    memcpy(bad, frame, fs);
    bad[fs] = 0;
    j = one_plane_job(bad, fs + 1, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    j = one_plane_job(frame, fs - 1, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    j = one_plane_job(frame, 3, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    /* two frames of N/2 each: each declares N/2 */
    size_t h1 = ZSTD_compress(bad, sizeof bad, plane, N / 2, 1);
    size_t h2 = ZSTD_compress(bad + h1, sizeof bad - h1, plane, N / 2, 1);
    j = one_plane_job(bad, h1 + h2, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    /* header says N + 1 (patched), the data holds N: the frame does not decode to its size */
    uint8_t raw[N + 1];
    tst_fill_random(raw, sizeof raw);
    size_t rf = ZSTD_compress(bad, sizeof bad, raw, N, 1);
    /* parse the frame header by hand (RFC 8878 3.1.1.1): magic, descriptor, then for a
     * single-segment frame without dictionary id a 2-byte content size field holding size - 256 */
    CHECK(!ZSTD_isError(rf) && ZSTD_getFrameContentSize(bad, rf) == N);
    uint8_t fhd = bad[4];
    if ((fhd >> 6) == 1 && (fhd & 0x20) && (fhd & 3) == 0) {
        unsigned v = (unsigned)bad[5] | ((unsigned)bad[6] << 8);
        CHECK(v + 256 == N);
        v++;
        bad[5] = (uint8_t)v;
        bad[6] = (uint8_t)(v >> 8);
        CHECK(ZSTD_getFrameContentSize(bad, rf) == N + 1);
        uint8_t *dst1 = tst_xmalloc(N + 1);
        j = one_plane_job(bad, rf, TS_CODEC_ZSTD, N + 1, dst1);
        CHECK_ST(run1(&j), TS_E_LIMIT); /* a frame larger than its plane: the size rule fires first */
        free(dst1);
    } else {
        CHECK(!"unexpected zstd frame header layout");
    }
    /* garbage */
    memset(bad, 0x5A, 64);
    j = one_plane_job(bad, 64, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    j = one_plane_job(bad, 0, TS_CODEC_ZSTD, N, dst);
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    free(dst);
}

static void test_run_job_rules(void)
{
    uint8_t dst[64], s[300];
    tst_fill_random(s, sizeof s);
    ts_chunk_job j;
    /* stored: size must be n */
    j = one_plane_job(s, 10, TS_CODEC_STORED, 10, dst);
    CHECK_ST(run1(&j), TS_OK);
    CHECK_MEM(dst, s, 10);
    j = one_plane_job(s, 9, TS_CODEC_STORED, 10, dst);
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    /* fill: size must be 1 */
    j = one_plane_job(s, 1, TS_CODEC_FILL, 10, dst);
    CHECK_ST(run1(&j), TS_OK);
    for (int i = 0; i < 10; i++) CHECK(dst[i] == s[0]);
    j = one_plane_job(s, 2, TS_CODEC_FILL, 10, dst);
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    /* unknown codec */
    for (int c = 5; c < 256; c += 50) {
        j = one_plane_job(s, 5, (uint8_t)c, 10, dst);
        CHECK_ST(run1(&j), TS_E_CODEC);
    }
    /* huffman plane shorter than its header; rans plane shorter than its table */
    j = one_plane_job(s, 10, TS_CODEC_HUFFMAN, 10, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    memset(s, 0, 10);
    j = one_plane_job(s, 10, TS_CODEC_RANS, 10, dst);
    CHECK_ST(run1(&j), TS_E_CORRUPT);
    tst_fill_random(s, sizeof s);
    /* plane sizes that run past the chunk / leave bytes over */
    j = one_plane_job(s, 10, TS_CODEC_STORED, 10, dst);
    j.src_size = 9;
    j.checksum = ts_xxh3(s, 9);
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    j.src_size = 11;
    j.checksum = ts_xxh3(s, 11);
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    j.plane_sizes[0] = 0xFFFFFFFFu;
    CHECK_ST(run1(&j), TS_E_LIMIT);
    /* bfloat16: two planes, sizes add up past src_size */
    memset(&j, 0, sizeof j);
    j.src = s;
    j.dst = dst;
    j.n_elems = 8;
    j.dtype = TS_DT_BFLOAT16;
    j.encoding = TS_ENC_PLANES;
    j.codecs[0] = TS_CODEC_FILL;
    j.plane_sizes[0] = 1;
    j.codecs[1] = TS_CODEC_STORED;
    j.plane_sizes[1] = 8;
    j.src_size = 9;
    CHECK_ST(run1(&j), TS_OK);
    j.src_size = 8;
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    /* unknown dtype / encoding */
    j.src_size = 9;
    j.dtype = 0;
    size_t failed = 5;
    uint8_t scratch[64];
    CHECK_ST(ts_run_job(&j, scratch, sizeof scratch, NULL), TS_E_DTYPE);
    CHECK_ST(ts_run_jobs(&j, 1, 1, &failed, NULL), TS_E_DTYPE);
    CHECK(failed == 0);
    j.dtype = TS_DT_BFLOAT16;
    j.encoding = 2;
    CHECK_ST(run1(&j), TS_E_ENCODING);
    j.encoding = 255;
    CHECK_ST(run1(&j), TS_E_ENCODING);
    /* scratch too small for ts_run_job */
    j.encoding = TS_ENC_PLANES;
    CHECK_ST(ts_run_job(&j, scratch, 7, NULL), TS_E_ARG);
    CHECK_ST(ts_run_job(&j, scratch, 8, NULL), TS_OK);
    /* raw: src_size must be n * itemsize; dst == NULL verifies only */
    memset(&j, 0, sizeof j);
    j.src = s;
    j.src_size = 16;
    j.dst = dst;
    j.n_elems = 4;
    j.dtype = TS_DT_INT32;
    j.encoding = TS_ENC_RAW;
    j.verify = 1;
    j.checksum = ts_xxh3(s, 16);
    memset(dst, 0, sizeof dst);
    CHECK_ST(run1(&j), TS_OK);
    CHECK_MEM(dst, s, 16);
    j.src_size = 15;
    j.checksum = ts_xxh3(s, 15);
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    j.src_size = 16;
    j.checksum ^= 1;
    CHECK_ST(run1(&j), TS_E_CHECKSUM);
    j.verify = 0;
    CHECK_ST(run1(&j), TS_OK);
    j.verify = 1;
    j.dst = NULL;
    CHECK_ST(run1(&j), TS_E_CHECKSUM);
    j.checksum = ts_xxh3(s, 16);
    CHECK_ST(run1(&j), TS_OK);
    /* planes verify-only with nonsense plane sizes: the chunk structure is checked first */
    memset(&j, 0, sizeof j);
    j.src = s;
    j.src_size = 20;
    j.n_elems = 3;
    j.dtype = TS_DT_FLOAT32;
    j.encoding = TS_ENC_PLANES;
    j.verify = 1;
    j.checksum = ts_xxh3(s, 20);
    CHECK_ST(run1(&j), TS_E_LAYOUT);
    /* empty job list */
    CHECK_ST(ts_run_jobs(NULL, 0, 4, &failed, NULL), TS_OK);
}

static void test_checksum_flip(void)
{
    uint64_t numel = 4000;
    uint8_t *src = tst_xmalloc(numel * 2);
    gen_data(TS_DT_BFLOAT16, src, numel, 2);
    encoded e;
    CHECK_ST(encode(&e, TS_DT_BFLOAT16, src, numel, 1000, TS_MODE_MAX, 3, 2), TS_OK);
    uint8_t **dsts;
    ts_chunk_job *jobs = make_jobs(&e, 1, &dsts);
    /* flip one bit in each byte position of chunk 2 in turn (sampled) */
    uint8_t *c2 = (uint8_t *)jobs[2].src;
    for (uint64_t b = 0; b < jobs[2].src_size; b += 1 + jobs[2].src_size / 50) {
        c2[b] ^= 0x10;
        for (int threads = 1; threads <= 4; threads += 3) {
            size_t failed = 99;
            CHECK_ST(ts_run_jobs(jobs, e.nchunks, threads, &failed, NULL), TS_E_CHECKSUM);
            CHECK(failed == 2);
        }
        c2[b] ^= 0x10;
    }
    /* stored checksum flipped */
    jobs[3].checksum ^= 1ull << 63;
    size_t failed = 0;
    CHECK_ST(ts_run_jobs(jobs, e.nchunks, 3, &failed, NULL), TS_E_CHECKSUM);
    CHECK(failed == 3);
    /* verify off: the decode itself runs */
    for (size_t k = 0; k < e.nchunks; k++) jobs[k].verify = 0;
    CHECK_ST(ts_run_jobs(jobs, e.nchunks, 3, &failed, NULL), TS_OK);
    free_jobs(jobs, dsts, e.nchunks);
    encoded_free(&e);
    free(src);
}

static void test_run_jobs_statuses(void)
{
    uint64_t numel = 6 * 500;
    uint8_t *src = tst_xmalloc(numel * 4);
    gen_data(TS_DT_FLOAT32, src, numel, 2);
    encoded e;
    CHECK_ST(encode(&e, TS_DT_FLOAT32, src, numel, 500, TS_MODE_HUFFMAN, 1, 2), TS_OK);
    CHECK(e.nchunks == 6);
    for (int threads = 1; threads <= 8; threads *= 2) {
        uint8_t **dsts;
        ts_chunk_job *jobs = make_jobs(&e, 1, &dsts);
        jobs[1].checksum ^= 1;                  /* TS_E_CHECKSUM */
        jobs[3].codecs[1] = 7;                  /* TS_E_CODEC */
        jobs[3].checksum = ts_xxh3(jobs[3].src, (size_t)jobs[3].src_size);
        jobs[5].src_size -= 1;                  /* plane sizes do not add up: TS_E_LAYOUT */
        jobs[5].checksum = ts_xxh3(jobs[5].src, (size_t)jobs[5].src_size);
        ts_status want[6] = {TS_OK, TS_E_CHECKSUM, TS_OK, TS_E_CODEC, TS_OK, TS_E_LAYOUT};
        ts_status sts[6];
        for (int i = 0; i < 6; i++) sts[i] = (ts_status)77;
        size_t failed = 99;
        CHECK_ST(ts_run_jobs(jobs, 6, threads, &failed, sts), TS_E_CHECKSUM);
        CHECK(failed == 1);
        for (int i = 0; i < 6; i++) CHECK_ST(sts[i], want[i]);
        /* good jobs decoded even though others failed */
        CHECK_MEM(dsts[0], e.src, 500 * 4);
        CHECK_MEM(dsts[4], e.src + 4 * 500 * 4, 500 * 4);
        /* early-stop mode: same first failure */
        failed = 99;
        CHECK_ST(ts_run_jobs(jobs, 6, threads, &failed, NULL), TS_E_CHECKSUM);
        CHECK(failed == 1);
        /* only a late failure */
        jobs[1].checksum ^= 1;
        jobs[3].codecs[1] = e.chunks[3].codecs[1];
        jobs[3].checksum = e.chunks[3].checksum;
        failed = 99;
        CHECK_ST(ts_run_jobs(jobs, 6, threads, &failed, sts), TS_E_LAYOUT);
        CHECK(failed == 5);
        for (int i = 0; i < 5; i++) CHECK_ST(sts[i], TS_OK);
        CHECK_ST(sts[5], TS_E_LAYOUT);
        /* an unknown dtype in one job: statuses mode must still run every job and report the
         * lowest failing job (docs of ts_run_jobs) */
        jobs[2].dtype = 0;
        jobs[0].checksum ^= 1;
        for (int i = 0; i < 6; i++) sts[i] = (ts_status)77;
        failed = 99;
        ts_status st = ts_run_jobs(jobs, 6, threads, &failed, sts);
        if (threads == 1) {
            KNOWN_BUG(st == TS_E_CHECKSUM && failed == 0,
                      "RUNJOBS-DTYPE (an invalid dtype in job i aborts before any job runs: returns TS_E_DTYPE "
                      "with failed=i, not the lowest failing job)");
            KNOWN_BUG(sts[0] == TS_E_CHECKSUM && sts[1] == TS_OK && sts[2] == TS_E_DTYPE,
                      "RUNJOBS-DTYPE-STATUSES (statuses[] left unwritten when a job has an invalid dtype)");
        }
        free_jobs(jobs, dsts, 6);
    }
    encoded_free(&e);
    free(src);
}

/* plane_stride != 0: planes decoded unmerged at dst + p * stride, exactly those bytes written */
static void test_run_jobs_unmerged(void)
{
    static const unsigned dtypes[] = {TS_DT_BFLOAT16, TS_DT_FLOAT32, TS_DT_FLOAT16, TS_DT_INT64, TS_DT_UINT8};
    static const int modes[] = {TS_MODE_MAX, TS_MODE_HUFFMAN, TS_MODE_ZSTD};
    for (size_t di = 0; di < sizeof dtypes / sizeof *dtypes; di++) {
        for (size_t mi = 0; mi < sizeof modes / sizeof *modes; mi++) {
            unsigned dt = dtypes[di];
            unsigned isz = ts_dtype_size(dt);
            uint64_t numel = 5000, ce = 1536;
            uint8_t *src = tst_xmalloc((size_t)numel * isz);
            gen_data(dt, src, numel, 2);
            memset(src + 100 * isz, 0, 600 * isz); /* a run: fill / zstd-friendly planes */
            encoded e;
            CHECK_ST(encode(&e, dt, src, numel, ce, modes[mi], 3, 2), TS_OK);
            /* the planes of every element, as the spec's split gives them */
            uint8_t *want = tst_xmalloc((size_t)numel * isz);
            uint8_t *pp[TS_MAX_PLANES];
            for (unsigned p = 0; p < isz; p++) pp[p] = want + (size_t)p * numel;
            CHECK_ST(ts_planes_split(dt, src, (size_t)numel, pp), TS_OK);
            /* one destination for the whole tensor, plane-major: plane p at p * numel, 2 guard bytes */
            size_t span = (size_t)numel * isz;
            uint8_t *dst = tst_xmalloc(span + 2);
            memset(dst, 0xEE, span + 2);
            ts_chunk_job *jobs = tst_xmalloc((e.nchunks + 1) * sizeof *jobs);
            uint64_t off = 0;
            for (size_t k = 0; k < e.nchunks; k++) {
                ts_chunk_job *j = &jobs[k];
                memset(j, 0, sizeof *j);
                j->src = e.enc + off;
                j->src_size = e.chunks[k].size;
                j->dst = dst + k * ce;
                j->n_elems = chunk_n(&e, k);
                j->checksum = e.chunks[k].checksum;
                j->dtype = (uint8_t)dt;
                j->encoding = TS_ENC_PLANES;
                j->verify = 1;
                j->plane_stride = numel;
                memcpy(j->codecs, e.chunks[k].codecs, sizeof j->codecs);
                memcpy(j->plane_sizes, e.chunks[k].plane_sizes, sizeof j->plane_sizes);
                off += e.chunks[k].size;
            }
            size_t failed = 0;
            CHECK_ST(ts_run_jobs(jobs, e.nchunks, 2, &failed, NULL), TS_OK);
            CHECK_MEM(dst, want, span);
            CHECK(dst[span] == 0xEE && dst[span + 1] == 0xEE);
            /* a stride shorter than the chunk is an argument error; so is a raw job with a stride */
            ts_chunk_job bad = jobs[0];
            bad.plane_stride = bad.n_elems - 1;
            CHECK_ST(ts_run_jobs(&bad, 1, 1, &failed, NULL), isz > 1 || bad.n_elems > 1 ? TS_E_ARG : TS_OK);
            bad = jobs[0];
            bad.encoding = TS_ENC_RAW;
            CHECK_ST(ts_run_jobs(&bad, 1, 1, &failed, NULL), TS_E_ARG);
            /* damage is reported as in the merged path */
            bad = jobs[0];
            bad.src_size -= 1;
            bad.verify = 0;
            ts_status st = ts_run_jobs(&bad, 1, 1, &failed, NULL);
            CHECK(st == TS_E_LAYOUT || st == TS_E_TRUNCATED);
            free(jobs);
            free(dst);
            free(want);
            free(src);
            encoded_free(&e);
        }
    }
}

static void test_many_threads(void)
{
    /* more threads than jobs, more than 256 threads, 0 and negative thread counts */
    uint64_t numel = 300;
    uint8_t *src = tst_xmalloc(numel);
    gen_data(TS_DT_INT8, src, numel, 3);
    int tcounts[] = {-5, 0, 1, 2, 299, 300, 301, 1000};
    for (size_t t = 0; t < sizeof tcounts / sizeof tcounts[0]; t++) {
        encoded e;
        CHECK_ST(encode(&e, TS_DT_INT8, src, numel, 1, TS_MODE_HUFFMAN, 1, tcounts[t]), TS_OK);
        CHECK(e.nchunks == 300);
        check_encoded(&e, TS_MODE_HUFFMAN, tcounts[t]);
        uint64_t *sums = tst_xmalloc(300 * sizeof *sums);
        CHECK_ST(ts_checksum_chunks(src, numel, 1, tcounts[t], sums), TS_OK);
        CHECK_U64(sums[299], ts_xxh3(src + 299, 1));
        free(sums);
        encoded_free(&e);
    }
    free(src);
}

void suite_codec(void)
{
    RUN(test_xxh3);
    RUN(test_encode_roundtrip);
    RUN(test_encode_choice_reference);
    RUN(test_encode_codec_choice);
    RUN(test_encode_args);
    RUN(test_checksum_chunks);
    RUN(test_zstd_plane_rules);
    RUN(test_run_job_rules);
    RUN(test_checksum_flip);
    RUN(test_run_jobs_statuses);
    RUN(test_many_threads);
    RUN(test_run_jobs_unmerged);
}
