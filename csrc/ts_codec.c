#define _POSIX_C_SOURCE 200809L
#include "ts_codec.h"
#include "ts_huff.h"
#include "ts_rans.h"

#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "tinyserve's codec assumes a little-endian host"
#endif

uint64_t ts_xxh3(const void *p, size_t n) { return XXH3_64bits(p, n); }

unsigned ts_zstd_version(void) { return ZSTD_versionNumber(); }

/* ---------------------------------------------------------------- a tiny fork/join pool */
typedef struct {
    atomic_size_t next;
    size_t n;
    void *ctx;
    void (*fn)(void *ctx, size_t i, void *worker);
    size_t worker_size;
    int (*worker_init)(void *worker, void *ctx);
    void (*worker_fini)(void *worker);
    atomic_int failed_init;
} pool;

typedef struct {
    pool *p;
    _Alignas(max_align_t) unsigned char w[256]; /* the worker's state (enc_worker / dec_worker) */
} pool_thread;

static void *pool_main(void *arg)
{
    pool_thread *t = arg;
    pool *p = t->p;
    if (p->worker_init && p->worker_init(t->w, p->ctx)) {
        atomic_store(&p->failed_init, 1);
        return NULL;
    }
    for (;;) {
        size_t i = atomic_fetch_add(&p->next, 1);
        if (i >= p->n) break;
        p->fn(p->ctx, i, t->w);
    }
    if (p->worker_fini) p->worker_fini(t->w);
    return NULL;
}

/* Runs fn(ctx, i) for i in [0, n) on up to `threads` threads (the caller is one of them).
 * Returns TS_E_NOMEM if no worker could start at all. */
static ts_status pool_run(pool *p, int threads)
{
    if (threads < 1) threads = 1;
    if ((size_t)threads > p->n) threads = p->n ? (int)p->n : 1;
    if (threads > 256) threads = 256;
    pthread_t tid[256];
    pool_thread *ts = calloc((size_t)threads, sizeof *ts);
    if (!ts) return TS_E_NOMEM;
    int started = 0;
    for (int k = 1; k < threads; k++) {
        ts[k].p = p;
        if (pthread_create(&tid[k], NULL, pool_main, &ts[k])) break;
        started++;
    }
    ts[0].p = p;
    pool_main(&ts[0]);
    for (int k = 1; k <= started; k++) pthread_join(tid[k], NULL);
    free(ts);
    /* If every thread failed its init nothing ran; the caller's worker init failing with others
     * running is harmless: the others drained the queue. */
    return atomic_load(&p->next) >= p->n ? TS_OK : TS_E_NOMEM;
}

/* ---------------------------------------------------------------- encoding */
typedef struct {
    uint8_t *planes;   /* itemsize * chunk_elems */
    uint8_t *cand, *cand2; /* candidate streams for one plane */
    size_t cand_cap;
    ZSTD_CCtx *cctx;
} enc_worker;

typedef struct {
    unsigned dtype, isz, flags;
    const uint8_t *src;
    uint64_t numel, chunk_elems;
    int mode, level;
    uint8_t *dst; /* chunk k is encoded at dst + k * chunk_elems * isz, compacted afterwards */
    ts_chunk_out *chunks;
    _Atomic int status;
} enc_ctx;

static int enc_init(void *w, void *c)
{
    enc_worker *ew = w;
    enc_ctx *ec = c;
    size_t n = (size_t)ec->chunk_elems;
    if (n > ec->numel) n = (size_t)ec->numel;
    ew->planes = malloc(n * ec->isz + 1);
    ew->cand_cap = ZSTD_compressBound(n) + TS_HUF_HEADER + TS_HUF_SLACK + 64;
    ew->cand = malloc(ew->cand_cap);
    ew->cand2 = malloc(ew->cand_cap);
    ew->cctx = ZSTD_createCCtx();
    if (!ew->planes || !ew->cand || !ew->cand2 || !ew->cctx) {
        free(ew->planes);
        free(ew->cand);
        free(ew->cand2);
        ZSTD_freeCCtx(ew->cctx);
        return 1;
    }
    return 0;
}

static void enc_fini(void *w)
{
    enc_worker *ew = w;
    free(ew->planes);
    free(ew->cand);
    free(ew->cand2);
    ZSTD_freeCCtx(ew->cctx);
}

static int all_equal(const uint8_t *p, size_t n)
{
    for (size_t i = 1; i < n; i++)
        if (p[i] != p[0]) return 0;
    return 1;
}

static void enc_chunk(void *c, size_t k, void *w)
{
    enc_ctx *ec = c;
    enc_worker *ew = w;
    uint64_t first = (uint64_t)k * ec->chunk_elems;
    size_t n = (size_t)(ec->numel - first < ec->chunk_elems ? ec->numel - first : ec->chunk_elems);
    uint8_t *planes[TS_MAX_PLANES];
    for (unsigned p = 0; p < ec->isz; p++) planes[p] = ew->planes + (size_t)p * n;
    ts_planes_split_ex(ec->dtype, ec->flags, ec->src + first * ec->isz, n, planes);
    uint8_t *out = ec->dst + first * ec->isz, *o = out;
    ts_chunk_out *co = &ec->chunks[k];
    memset(co, 0, sizeof *co);
    for (unsigned p = 0; p < ec->isz; p++) {
        const uint8_t *pl = planes[p];
        if (all_equal(pl, n) && n > 1) {
            co->codecs[p] = TS_CODEC_FILL;
            co->plane_sizes[p] = 1;
            *o++ = pl[0];
            continue;
        }
        size_t best = n; /* stored */
        int best_codec = TS_CODEC_STORED;
        const uint8_t *best_src = pl;
        if (ec->mode == TS_MODE_ZSTD || ec->mode == TS_MODE_MAX || ec->mode == TS_MODE_ZSTD_HUFFMAN) {
            size_t z = ZSTD_compressCCtx(ew->cctx, ew->cand, ew->cand_cap, pl, n, ec->level);
            if (!ZSTD_isError(z) && z < best) {
                best = z;
                best_codec = TS_CODEC_ZSTD;
                memcpy(o, ew->cand, z); /* o has room: z < n */
                best_src = o;
            }
        }
        /* each next candidate must be strictly smaller than the best so far (ties keep the lower
         * codec number); huffman goes to cand, rans to cand2, so the winner is never overwritten */
        if (ec->mode != TS_MODE_ZSTD) {
            size_t h;
            if (best > 0 && ts_huf_encode(pl, n, ew->cand, ew->cand_cap, best - 1, &h) == TS_OK) {
                best = h;
                best_codec = TS_CODEC_HUFFMAN;
                best_src = ew->cand;
            }
        }
        if (ec->mode == TS_MODE_MAX || ec->mode == TS_MODE_RANS) {
            /* rans decodes at about half huffman's speed: it must save at least 1/128 of the best
             * other candidate to pay for that (it does on exponent planes, rarely on mantissas) */
            size_t r, limit = best / 128 * 127 + (best % 128) * 127 / 128;
            if (limit > 0 && ts_rans_encode(pl, n, ew->cand2, ew->cand_cap, limit, &r) == TS_OK) {
                best = r;
                best_codec = TS_CODEC_RANS;
                best_src = ew->cand2;
            }
        }
        if (best_src != o) memmove(o, best_src, best);
        co->codecs[p] = (uint8_t)best_codec;
        co->plane_sizes[p] = (uint32_t)best;
        o += best;
    }
    co->size = (uint64_t)(o - out);
    co->checksum = XXH3_64bits(out, (size_t)co->size);
}

ts_status ts_encode_planes(unsigned dtype, const uint8_t *src, uint64_t numel, uint64_t chunk_elems,
                           int mode, int level, int threads, uint8_t *dst, uint64_t *out_size,
                           ts_chunk_out *chunks)
{
    return ts_encode_planes_ex(dtype, 0, src, numel, chunk_elems, mode, level, threads, dst, out_size, chunks);
}

ts_status ts_encode_planes_ex(unsigned dtype, unsigned flags, const uint8_t *src, uint64_t numel,
                              uint64_t chunk_elems, int mode, int level, int threads, uint8_t *dst,
                              uint64_t *out_size, ts_chunk_out *chunks)
{
    unsigned isz = ts_dtype_size(dtype);
    if (!isz) return TS_E_DTYPE;
    if (!chunk_elems || chunk_elems > (16u << 20) / isz || mode < 0 || mode > 4) return TS_E_ARG;
    *out_size = 0;
    if (!numel) return TS_OK;
    enc_ctx ec = {.dtype = dtype, .isz = isz, .flags = flags & TS_PLANES_F16_EXP, .src = src, .numel = numel, .chunk_elems = chunk_elems,
                  .mode = mode, .level = level, .dst = dst, .chunks = chunks};
    size_t nchunks = (size_t)((numel + chunk_elems - 1) / chunk_elems);
    pool p = {.n = nchunks, .ctx = &ec, .fn = enc_chunk, .worker_init = enc_init, .worker_fini = enc_fini};
    atomic_init(&p.next, 0);
    atomic_init(&p.failed_init, 0);
    ts_status st = pool_run(&p, threads);
    if (st) return st;
    /* compact: chunk k sits at k * chunk_elems * isz; move it down to follow chunk k-1 */
    uint64_t pos = 0;
    for (size_t k = 0; k < nchunks; k++) {
        uint8_t *from = dst + (uint64_t)k * chunk_elems * isz;
        if (dst + pos != from) memmove(dst + pos, from, (size_t)chunks[k].size);
        pos += chunks[k].size;
    }
    *out_size = pos;
    return TS_OK;
}

/* ---------------------------------------------------------------- checksums */
typedef struct {
    const uint8_t *src;
    uint64_t n, chunk;
    uint64_t *out;
} sum_ctx;

static void sum_one(void *c, size_t k, void *w)
{
    (void)w;
    sum_ctx *sc = c;
    uint64_t off = (uint64_t)k * sc->chunk;
    uint64_t len = sc->n - off < sc->chunk ? sc->n - off : sc->chunk;
    sc->out[k] = XXH3_64bits(sc->src + off, (size_t)len);
}

ts_status ts_checksum_chunks(const uint8_t *src, uint64_t n, uint64_t chunk_bytes, int threads,
                             uint64_t *out)
{
    if (!chunk_bytes) return TS_E_ARG;
    sum_ctx sc = {src, n, chunk_bytes, out};
    pool p = {.n = (size_t)(n / chunk_bytes + (n % chunk_bytes != 0)), .ctx = &sc, .fn = sum_one};
    atomic_init(&p.next, 0);
    atomic_init(&p.failed_init, 0);
    return pool_run(&p, threads);
}

/* ---------------------------------------------------------------- decoding */
static uint64_t le(const uint8_t *p, unsigned k)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < k; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

ts_status ts_zstd_check_frame(const uint8_t *s, uint64_t sz, uint64_t n, ts_codec_error *err)
{
    if (sz < 4) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_SHORT, sz, 0, 0);
    uint64_t magic = le(s, 4);
    if (magic != 0xFD2FB528u) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_MAGIC, magic, 0, 0);
    if (sz < 5) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_HEADER, 5, sz, 0);
    unsigned fhd = s[4], fcs_flag = fhd >> 6, single = (fhd >> 5) & 1, csum = (fhd >> 2) & 1;
    static const unsigned did_len[4] = {0, 1, 2, 4}, fcs_len[4] = {0, 2, 4, 8};
    unsigned dl = did_len[fhd & 3], fl = fcs_flag ? fcs_len[fcs_flag] : single;
    uint64_t hsize = 5 + !single + dl + fl;
    if (fhd & 0x08) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_RESERVED, fhd, 0, 0);
    if (sz < hsize) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_HEADER, hsize, sz, 0);
    const uint8_t *q = s + 5;
    uint64_t window = 0;
    if (!single) {
        unsigned wd = *q++, wlog = 10 + (wd >> 3);
        window = ((uint64_t)1 << wlog) + (((uint64_t)1 << wlog) >> 3) * (wd & 7);
    }
    uint64_t did = le(q, dl);
    q += dl;
    if (did) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_DICT, did, 0, 0);
    if (!fl) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_NO_SIZE, 0, n, 0);
    uint64_t fcs = le(q, fl) + (fl == 2 ? 256 : 0);
    if (fcs != n) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_SIZE, fcs, n, 0);
    if (single) window = fcs;
    uint64_t bmax = window < (128u << 10) ? window : (128u << 10);
    uint64_t pos = hsize, k = 0;
    for (;;) {
        if (sz - pos < 3) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_TRUNCATED, k, sz, 0);
        uint64_t bh = le(s + pos, 3), type = (bh >> 1) & 3, bsize = bh >> 3;
        if (type == 3) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_BLOCK_TYPE, k, 0, 0);
        if (bsize > bmax) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_BLOCK_SIZE, k, bsize, bmax);
        uint64_t body = type == 1 ? 1 : bsize;
        if (sz - pos - 3 < body) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_TRUNCATED, k, sz, 0);
        pos += 3 + body;
        k++;
        if (bh & 1) break;
    }
    if (csum) {
        if (sz - pos < 4) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_TRUNCATED, k, sz, 0);
        pos += 4;
    }
    if (pos != sz) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_TRAILING, pos, sz - pos, 0);
    return TS_OK;
}

/* Decode one non-stored plane stream of `sz` bytes into d (n bytes). */
static ts_status decode_plane(uint8_t codec, const uint8_t *s, uint64_t sz, uint8_t *d, size_t n, void *dctx,
                              ts_codec_error *err)
{
    switch (codec) {
    case TS_CODEC_STORED:
        memcpy(d, s, n);
        return TS_OK;
    case TS_CODEC_FILL:
        memset(d, s[0], n);
        return TS_OK;
    case TS_CODEC_ZSTD: {
        ts_status st = ts_zstd_check_frame(s, sz, n, err);
        if (st) return st;
        size_t r = ZSTD_decompressDCtx((ZSTD_DCtx *)dctx, d, n, s, (size_t)sz);
        if (ZSTD_isError(r)) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_DECODE, 0, 0, 0);
        if (r != n) return ts_rule_fail(err, TS_E_CORRUPT, TS_RULE_ZSTD_LENGTH, r, n, 0);
        return TS_OK;
    }
    case TS_CODEC_HUFFMAN:
        return ts_huf_decode_ex(s, (size_t)sz, d, n, err);
    case TS_CODEC_RANS:
        return ts_rans_decode_ex(s, (size_t)sz, d, n, err);
    default:
        return ts_rule_fail(err, TS_E_CODEC, TS_RULE_PLANE_CODEC, codec, 0, 0);
    }
}

ts_status ts_decode_stream(uint8_t codec, const uint8_t *s, uint64_t sz, uint8_t *d, size_t n, ts_codec_error *err)
{
    if (codec == TS_CODEC_STORED && sz != n) return ts_rule_fail(err, TS_E_LAYOUT, TS_RULE_STORED_SIZE, sz, n, 0);
    if (codec == TS_CODEC_FILL && sz != 1) return ts_rule_fail(err, TS_E_LAYOUT, TS_RULE_FILL_SIZE, sz, 0, 0);
    ZSTD_DCtx *dctx = NULL;
    if (codec == TS_CODEC_ZSTD && !(dctx = ZSTD_createDCtx())) return TS_E_NOMEM;
    ts_status st = decode_plane(codec, s, sz, d, n, dctx, err);
    ZSTD_freeDCtx(dctx);
    return st;
}

/* The structure rules of a chunk (index rules the decoder re-checks, in the reader's order). */
static ts_status check_structure(const ts_chunk_job *job, unsigned isz, uint64_t n, ts_codec_error *err)
{
    if (job->encoding == TS_ENC_RAW) {
        if (job->src_size != n * isz) return ts_rule_fail(err, TS_E_LAYOUT, TS_RULE_RAW_SIZE, job->src_size, n, isz);
        return TS_OK;
    }
    uint64_t total = 0;
    for (unsigned p = 0; p < isz; p++) {
        uint64_t sz = job->plane_sizes[p];
        uint8_t c = job->codecs[p];
        ts_status st = TS_OK;
        if (err) err->plane = p;
        if (c > TS_CODEC_RANS) st = ts_rule_fail(err, TS_E_CODEC, TS_RULE_PLANE_CODEC, c, 0, 0);
        else if (sz > n) st = ts_rule_fail(err, TS_E_LIMIT, TS_RULE_PLANE_SIZE_MAX, sz, n, 0);
        else if (c == TS_CODEC_STORED && sz != n) st = ts_rule_fail(err, TS_E_LAYOUT, TS_RULE_STORED_SIZE, sz, n, 0);
        else if (c == TS_CODEC_FILL && sz != 1) st = ts_rule_fail(err, TS_E_LAYOUT, TS_RULE_FILL_SIZE, sz, 0, 0);
        else if (sz == 0) st = ts_rule_fail(err, TS_E_LAYOUT, TS_RULE_PLANE_SIZE_ZERO, 0, 0, 0);
        if (st) return st;
        total += sz;
    }
    if (err) err->plane = TS_NO_PLANE;
    if (total != job->src_size) return ts_rule_fail(err, TS_E_LAYOUT, TS_RULE_PLANES_SUM, total, job->src_size, 0);
    return TS_OK;
}

static ts_status check_decoded(const ts_chunk_job *job, const uint8_t *bytes, size_t len, ts_codec_error *err)
{
    uint64_t h = XXH3_64bits(bytes, len);
    if (h != job->decoded_checksum)
        return ts_rule_fail(err, TS_E_DECODED_CHECKSUM, TS_RULE_DECODED_CHECKSUM, job->decoded_checksum, h, 0);
    return TS_OK;
}

/* Regroup into dst and hash the element bytes in one pass: blocks of MERGE_BLOCK elements are hashed
 * (XXH3 streaming, the same value as one call over the whole chunk) while they are still in cache. */
#define MERGE_BLOCK 8192
static ts_status merge_and_check(const ts_chunk_job *job, unsigned order, const uint8_t *const planes[],
                                 size_t n, unsigned isz, ts_codec_error *err)
{
    XXH3_state_t hs;
    XXH3_64bits_reset(&hs);
    for (size_t i = 0; i < n; i += MERGE_BLOCK) {
        size_t k = n - i < MERGE_BLOCK ? n - i : MERGE_BLOCK;
        const uint8_t *pl[TS_MAX_PLANES];
        for (unsigned p = 0; p < isz; p++) pl[p] = planes[p] + i;
        ts_status st = ts_planes_merge_ex(job->dtype, order, pl, k, job->dst + i * isz);
        if (st) return st;
        XXH3_64bits_update(&hs, job->dst + i * isz, k * isz);
    }
    uint64_t h = XXH3_64bits_digest(&hs);
    if (h != job->decoded_checksum)
        return ts_rule_fail(err, TS_E_DECODED_CHECKSUM, TS_RULE_DECODED_CHECKSUM, job->decoded_checksum, h, 0);
    return TS_OK;
}

ts_status ts_run_job(const ts_chunk_job *job, uint8_t *scratch, size_t scratch_size, void *dctx)
{
    ts_codec_error *err = job->err;
    if (err) {
        memset(err, 0, sizeof *err);
        err->plane = TS_NO_PLANE;
    }
    unsigned isz = ts_dtype_size(job->dtype);
    if (!isz) return TS_E_DTYPE;
    if (job->encoding != TS_ENC_RAW && job->encoding != TS_ENC_PLANES) return TS_E_ENCODING;
    if (job->encoding == TS_ENC_RAW && job->plane_stride) return TS_E_ARG;
    size_t n = (size_t)job->n_elems;
    ts_status st = check_structure(job, isz, n, err);
    if (st) return st;
    if (job->verify) {
        uint64_t h = XXH3_64bits(job->src, (size_t)job->src_size);
        if (h != job->checksum) return ts_rule_fail(err, TS_E_CHECKSUM, TS_RULE_CHECKSUM, job->checksum, h, 0);
    }
    if (job->encoding == TS_ENC_RAW) {
        /* the decoded bytes are the stored bytes */
        if (job->verify && job->has_decoded) {
            st = check_decoded(job, job->src, (size_t)job->src_size, err);
            if (st) return st;
        }
        if (job->dst) memcpy(job->dst, job->src, (size_t)job->src_size);
        return TS_OK;
    }
    int validate = !job->dst && (job->flags & TS_JOB_VALIDATE);
    if (!job->dst && !validate) return TS_OK;
    if (job->plane_stride && job->plane_stride < (uint64_t)n) return TS_E_ARG;
    const uint8_t *planes[TS_MAX_PLANES];
    uint64_t off = 0;
    size_t used = 0;
    for (unsigned p = 0; p < isz; p++) {
        uint64_t sz = job->plane_sizes[p];
        const uint8_t *s = job->src + off;
        off += sz;
        uint8_t *d;
        if (job->plane_stride) {
            d = job->dst + (size_t)p * job->plane_stride;
        } else if (job->codecs[p] == TS_CODEC_STORED) {
            planes[p] = s;
            continue;
        } else {
            if (used + n > scratch_size) return TS_E_ARG;
            d = scratch + used;
            used += n;
        }
        if (err) err->plane = p;
        st = decode_plane(job->codecs[p], s, sz, d, n, dctx, err);
        if (st) return st;
        if (err) err->plane = TS_NO_PLANE;
        planes[p] = d;
    }
    unsigned order = job->flags & TS_JOB_F16_EXP;
    int check = job->verify && job->has_decoded;
    if (!job->plane_stride && job->dst) {
        if (!check) return ts_planes_merge_ex(job->dtype, order, planes, n, job->dst);
        return merge_and_check(job, order, planes, n, isz, err);
    }
    if (!check) return TS_OK; /* unmerged, or validate without a decoded checksum: decoding was the check */
    /* regroup into scratch to hash the element bytes */
    if (used + (size_t)n * isz > scratch_size) return TS_E_ARG;
    uint8_t *m = scratch + used;
    st = ts_planes_merge_ex(job->dtype, order, planes, n, m);
    if (st) return st;
    return check_decoded(job, m, (size_t)n * isz, err);
}

typedef struct {
    uint8_t *scratch;
    size_t scratch_size;
    ZSTD_DCtx *dctx;
} dec_worker;

typedef struct {
    const ts_chunk_job *jobs;
    ts_status *statuses;
    size_t scratch_size;
    atomic_size_t first_fail;
    _Atomic int status;
    pthread_mutex_t mu;
} dec_ctx;

static int dec_init(void *w, void *c)
{
    dec_worker *dw = w;
    dec_ctx *dc = c;
    dw->scratch_size = dc->scratch_size;
    dw->scratch = malloc(dw->scratch_size ? dw->scratch_size : 1);
    dw->dctx = ZSTD_createDCtx();
    if (!dw->scratch || !dw->dctx) {
        free(dw->scratch);
        ZSTD_freeDCtx(dw->dctx);
        return 1;
    }
    return 0;
}

static void dec_fini(void *w)
{
    dec_worker *dw = w;
    free(dw->scratch);
    ZSTD_freeDCtx(dw->dctx);
}

static void dec_one(void *c, size_t i, void *w)
{
    dec_ctx *dc = c;
    dec_worker *dw = w;
    if (!dc->statuses && atomic_load(&dc->first_fail) < i) return; /* an earlier job failed */
    ts_status st = ts_run_job(&dc->jobs[i], dw->scratch, dw->scratch_size, dw->dctx);
    if (dc->statuses) dc->statuses[i] = st;
    if (st) {
        pthread_mutex_lock(&dc->mu);
        if (i < atomic_load(&dc->first_fail)) {
            atomic_store(&dc->first_fail, i);
            atomic_store(&dc->status, st);
        }
        pthread_mutex_unlock(&dc->mu);
    }
}

ts_status ts_run_jobs(const ts_chunk_job *jobs, size_t njobs, int threads, size_t *failed,
                      ts_status *statuses)
{
    size_t scratch = 0;
    for (size_t i = 0; i < njobs; i++) {
        unsigned isz = ts_dtype_size(jobs[i].dtype); /* 0 for an unknown dtype: ts_run_job reports it */
        if (jobs[i].encoding != TS_ENC_PLANES) continue;
        int validate = !jobs[i].dst && (jobs[i].flags & TS_JOB_VALIDATE);
        if (!jobs[i].dst && !validate) continue;
        size_t need = 0, n = (size_t)jobs[i].n_elems;
        if (!jobs[i].plane_stride)
            for (unsigned p = 0; p < isz; p++)
                if (jobs[i].codecs[p] != TS_CODEC_STORED) need += n;
        /* the regrouped copy that is hashed (unmerged and validate jobs) */
        if (jobs[i].verify && jobs[i].has_decoded && (validate || jobs[i].plane_stride)) need += n * isz;
        if (need > scratch) scratch = need;
    }
    dec_ctx dc = {.jobs = jobs, .statuses = statuses, .scratch_size = scratch};
    atomic_init(&dc.first_fail, (size_t)-1);
    atomic_init(&dc.status, TS_OK);
    pthread_mutex_init(&dc.mu, NULL);
    pool p = {.n = njobs, .ctx = &dc, .fn = dec_one, .worker_init = dec_init, .worker_fini = dec_fini};
    atomic_init(&p.next, 0);
    atomic_init(&p.failed_init, 0);
    ts_status st = pool_run(&p, threads);
    pthread_mutex_destroy(&dc.mu);
    if (st) {
        *failed = atomic_load(&p.next) < njobs ? atomic_load(&p.next) : 0;
        return st;
    }
    if (atomic_load(&dc.status) != TS_OK) {
        *failed = atomic_load(&dc.first_fail);
        return (ts_status)atomic_load(&dc.status);
    }
    return TS_OK;
}
