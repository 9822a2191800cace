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
    unsigned dtype, isz;
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
    ts_planes_split(ec->dtype, ec->src + first * ec->isz, n, planes);
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
        if (ec->mode == TS_MODE_ZSTD || ec->mode == TS_MODE_MAX) {
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
    unsigned isz = ts_dtype_size(dtype);
    if (!isz) return TS_E_DTYPE;
    if (!chunk_elems || chunk_elems > (16u << 20) / isz || mode < 0 || mode > 3) return TS_E_ARG;
    *out_size = 0;
    if (!numel) return TS_OK;
    enc_ctx ec = {.dtype = dtype, .isz = isz, .src = src, .numel = numel, .chunk_elems = chunk_elems,
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
/* Decode one plane stream of `sz` bytes into d (n bytes). */
static ts_status decode_plane(uint8_t codec, const uint8_t *s, uint64_t sz, uint8_t *d, size_t n, void *dctx)
{
    switch (codec) {
    case TS_CODEC_STORED:
        if (sz != n) return TS_E_LAYOUT;
        if (n) memcpy(d, s, n);
        return TS_OK;
    case TS_CODEC_FILL:
        if (sz != 1) return TS_E_LAYOUT;
        memset(d, s[0], n);
        return TS_OK;
    case TS_CODEC_ZSTD: {
        unsigned long long cs = ZSTD_getFrameContentSize(s, (size_t)sz);
        if (cs == ZSTD_CONTENTSIZE_ERROR) return TS_E_CORRUPT;
        if (cs != (unsigned long long)n) return TS_E_CORRUPT; /* unknown or wrong declared size */
        size_t fsz = ZSTD_findFrameCompressedSize(s, (size_t)sz);
        if (ZSTD_isError(fsz) || fsz != sz) return TS_E_CORRUPT;
        size_t r = ZSTD_decompressDCtx((ZSTD_DCtx *)dctx, d, n, s, (size_t)sz);
        if (ZSTD_isError(r) || r != n) return TS_E_CORRUPT;
        return TS_OK;
    }
    case TS_CODEC_HUFFMAN:
        return ts_huf_decode(s, (size_t)sz, d, n);
    case TS_CODEC_RANS:
        return ts_rans_decode(s, (size_t)sz, d, n);
    default:
        return TS_E_CODEC;
    }
}

/* A 'planes' job with plane_stride != 0: every plane decoded straight to dst + p * plane_stride. */
static ts_status run_job_unmerged(const ts_chunk_job *job, unsigned isz, size_t n, void *dctx)
{
    if (job->plane_stride < (uint64_t)n) return TS_E_ARG;
    uint64_t off = 0;
    for (unsigned p = 0; p < isz; p++) {
        uint64_t sz = job->plane_sizes[p];
        if (sz > job->src_size - off) return TS_E_TRUNCATED;
        ts_status st = decode_plane(job->codecs[p], job->src + off, sz, job->dst + (size_t)p * job->plane_stride,
                                    n, dctx);
        if (st) return st;
        off += sz;
    }
    if (off != job->src_size) return TS_E_LAYOUT;
    return TS_OK;
}

ts_status ts_run_job(const ts_chunk_job *job, uint8_t *scratch, size_t scratch_size, void *dctx)
{
    unsigned isz = ts_dtype_size(job->dtype);
    if (!isz) return TS_E_DTYPE;
    size_t n = (size_t)job->n_elems;
    if (job->verify && XXH3_64bits(job->src, (size_t)job->src_size) != job->checksum)
        return TS_E_CHECKSUM;
    if (job->encoding == TS_ENC_RAW) {
        if (job->plane_stride) return TS_E_ARG;
        if (job->src_size != (uint64_t)n * isz) return TS_E_LAYOUT;
        if (job->dst) memcpy(job->dst, job->src, (size_t)job->src_size);
        return TS_OK;
    }
    if (job->encoding != TS_ENC_PLANES) return TS_E_ENCODING;
    if (!job->dst) return TS_OK;
    if (job->plane_stride) return run_job_unmerged(job, isz, n, dctx);
    const uint8_t *planes[TS_MAX_PLANES];
    uint64_t off = 0;
    size_t used = 0;
    for (unsigned p = 0; p < isz; p++) {
        uint64_t sz = job->plane_sizes[p];
        if (sz > job->src_size - off) return TS_E_TRUNCATED;
        const uint8_t *s = job->src + off;
        off += sz;
        if (job->codecs[p] == TS_CODEC_STORED) {
            if (sz != n) return TS_E_LAYOUT;
            planes[p] = s;
            continue;
        }
        if (used + n > scratch_size) return TS_E_ARG;
        uint8_t *d = scratch + used;
        used += n;
        planes[p] = d;
        switch (job->codecs[p]) {
        case TS_CODEC_FILL:
            if (sz != 1) return TS_E_LAYOUT;
            memset(d, s[0], n);
            break;
        case TS_CODEC_ZSTD: {
            unsigned long long cs = ZSTD_getFrameContentSize(s, (size_t)sz);
            if (cs == ZSTD_CONTENTSIZE_ERROR) return TS_E_CORRUPT;
            if (cs != (unsigned long long)n) return TS_E_CORRUPT; /* unknown or wrong declared size */
            size_t fsz = ZSTD_findFrameCompressedSize(s, (size_t)sz);
            if (ZSTD_isError(fsz) || fsz != sz) return TS_E_CORRUPT;
            size_t r = ZSTD_decompressDCtx((ZSTD_DCtx *)dctx, d, n, s, (size_t)sz);
            if (ZSTD_isError(r) || r != n) return TS_E_CORRUPT;
            break;
        }
        case TS_CODEC_HUFFMAN: {
            ts_status st = ts_huf_decode(s, (size_t)sz, d, n);
            if (st) return st;
            break;
        }
        case TS_CODEC_RANS: {
            ts_status st = ts_rans_decode(s, (size_t)sz, d, n);
            if (st) return st;
            break;
        }
        default:
            return TS_E_CODEC;
        }
    }
    if (off != job->src_size) return TS_E_LAYOUT;
    return ts_planes_merge(job->dtype, planes, n, job->dst);
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
        if (jobs[i].encoding == TS_ENC_PLANES && jobs[i].dst && !jobs[i].plane_stride) {
            size_t need = 0;
            for (unsigned p = 0; p < isz; p++)
                if (jobs[i].codecs[p] != TS_CODEC_STORED) need += (size_t)jobs[i].n_elems;
            if (need > scratch) scratch = need;
        }
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
