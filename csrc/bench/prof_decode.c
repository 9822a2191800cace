/* Where the decode time of a float16 'planes' tensor goes (issue 12 item 12).
 *
 *   .venv/bin/python bench/bench_weights.py --dump-fp16 /tmp/minilm_fp16.bin   # MiniLM cast to float16
 *   make -C csrc prof && csrc/build/prof_decode /tmp/minilm_fp16.bin [repeats]
 *
 * Input: little-endian float16 elements back to back. The elements are cut into chunks of 2^19
 * elements (1 MiB, the writer's default) and regrouped in the float16 exponent-plane order (feature
 * bit 2, docs/format.md section 5): plane 0 = sign-less exponent and the top 3 mantissa bits, plane 1
 * = sign and the low 7 mantissa bits (stored). Prints, for plane 0, what each coding costs in bits per
 * element (order-0 entropy per chunk, tinyserve's Huffman stream, a zstd-3 frame, and the "exponent
 * only" split: a Huffman stream of the 5 exponent bits plus the 3 mantissa bits bit-packed), then the
 * thread CPU time of each decode phase (best of `repeats`), and the whole ts_run_jobs path.
 * Not a test: numbers depend on the machine; compare phases measured in the same run. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zstd.h>

#include "../ts_codec.h"
#include "../ts_huff.h"
#include "../ts_planes.h"

#define CHUNK ((size_t)1 << 19)

static double cpu_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

typedef struct {
    size_t n, nch;
    uint8_t *p0, *p1, *exp5;   /* planes; exp5 = p0 >> 3 */
    uint8_t **huf, **zst, **hexp; /* per chunk streams */
    size_t *huf_size, *zst_size, *hexp_size;
    uint8_t *dst, *scratch;
    ZSTD_DCtx *dctx;
} prof;

static size_t chunk_len(const prof *p, size_t k) { return p->n - k * CHUNK < CHUNK ? p->n - k * CHUNK : CHUNK; }

typedef void (*phase_fn)(prof *p);

static double best_of(prof *p, phase_fn fn, int repeats)
{
    double best = 1e30;
    for (int r = 0; r < repeats; r++) {
        double t = cpu_now();
        fn(p);
        t = cpu_now() - t;
        if (t < best) best = t;
    }
    return best;
}

static volatile uint64_t sink;

static void ph_memcpy(prof *p) { memcpy(p->dst, p->p0, p->n), memcpy(p->dst + p->n, p->p1, p->n); }

static void ph_stored_hash(prof *p)
{
    for (size_t k = 0; k < p->nch; k++)
        sink += ts_xxh3(p->zst[k], p->zst_size[k]) + ts_xxh3(p->p1 + k * CHUNK, chunk_len(p, k));
}

static void ph_zstd(prof *p)
{
    for (size_t k = 0; k < p->nch; k++)
        ZSTD_decompressDCtx(p->dctx, p->scratch, chunk_len(p, k), p->zst[k], p->zst_size[k]);
}

static void ph_huf(prof *p)
{
    for (size_t k = 0; k < p->nch; k++) ts_huf_decode(p->huf[k], p->huf_size[k], p->scratch, chunk_len(p, k));
}

static void ph_huf_exp(prof *p)
{
    for (size_t k = 0; k < p->nch; k++) ts_huf_decode(p->hexp[k], p->hexp_size[k], p->scratch, chunk_len(p, k));
}

static void ph_merge(prof *p)
{
    for (size_t k = 0; k < p->nch; k++) {
        const uint8_t *pl[2] = {p->p0 + k * CHUNK, p->p1 + k * CHUNK};
        ts_planes_merge_ex(TS_DT_FLOAT16, TS_PLANES_F16_EXP, pl, chunk_len(p, k), p->dst + 2 * k * CHUNK);
    }
}

static void ph_decoded_hash(prof *p)
{
    for (size_t k = 0; k < p->nch; k++) sink += ts_xxh3(p->dst + 2 * k * CHUNK, 2 * chunk_len(p, k));
}

/* one ts_run_jobs call over every chunk, plane 0 coded with `codec`, plane 1 stored */
static ts_chunk_job *make_jobs(prof *p, const uint8_t *src, int codec, int verify, uint8_t **chunk_mem)
{
    ts_chunk_job *jobs = xmalloc(p->nch * sizeof *jobs);
    for (size_t k = 0; k < p->nch; k++) {
        size_t m = chunk_len(p, k);
        const uint8_t *s0 = codec == TS_CODEC_ZSTD ? p->zst[k] : p->huf[k];
        size_t z = codec == TS_CODEC_ZSTD ? p->zst_size[k] : p->huf_size[k];
        chunk_mem[k] = xmalloc(z + m);
        memcpy(chunk_mem[k], s0, z);
        memcpy(chunk_mem[k] + z, p->p1 + k * CHUNK, m);
        ts_chunk_job *j = &jobs[k];
        memset(j, 0, sizeof *j);
        j->src = chunk_mem[k];
        j->src_size = z + m;
        j->dst = p->dst + 2 * k * CHUNK;
        j->n_elems = m;
        j->checksum = ts_xxh3(chunk_mem[k], z + m);
        j->dtype = TS_DT_FLOAT16;
        j->encoding = TS_ENC_PLANES;
        j->verify = (uint8_t)verify;
        j->codecs[0] = (uint8_t)codec;
        j->codecs[1] = TS_CODEC_STORED;
        j->plane_sizes[0] = (uint32_t)z;
        j->plane_sizes[1] = (uint32_t)m;
        j->decoded_checksum = ts_xxh3(src + 2 * k * CHUNK, 2 * m);
        j->has_decoded = 1;
        j->flags = TS_JOB_F16_EXP;
    }
    return jobs;
}

static double run_jobs(prof *p, const uint8_t *src, int codec, int verify, int repeats)
{
    uint8_t **mem = xmalloc(p->nch * sizeof *mem);
    ts_chunk_job *jobs = make_jobs(p, src, codec, verify, mem);
    double best = 1e30;
    for (int r = 0; r < repeats; r++) {
        size_t failed = 0;
        double t = cpu_now();
        ts_status st = ts_run_jobs(jobs, p->nch, 1, &failed, NULL);
        t = cpu_now() - t;
        if (st) {
            fprintf(stderr, "ts_run_jobs: %s (chunk %zu)\n", ts_strstatus(st), failed);
            exit(1);
        }
        if (t < best) best = t;
    }
    if (memcmp(p->dst, src, 2 * p->n)) {
        fprintf(stderr, "decoded bytes differ from the input\n");
        exit(1);
    }
    for (size_t k = 0; k < p->nch; k++) free(mem[k]);
    free(mem);
    free(jobs);
    return best;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s FLOAT16_FILE [repeats]\n", argv[0]);
        return 2;
    }
    int repeats = argc > 2 ? atoi(argv[2]) : 7;
    if (repeats < 1) repeats = 1;
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    rewind(f);
    if (len < 2 * (long)CHUNK) {
        fprintf(stderr, "%s: want at least %zu float16 elements\n", argv[1], CHUNK);
        return 1;
    }
    prof P = {0}, *p = &P;
    p->n = (size_t)len / 2;
    uint8_t *src = xmalloc(2 * p->n);
    if (fread(src, 1, 2 * p->n, f) != 2 * p->n) {
        perror("fread");
        return 1;
    }
    fclose(f);
    p->nch = (p->n + CHUNK - 1) / CHUNK;
    p->p0 = xmalloc(p->n);
    p->p1 = xmalloc(p->n);
    p->exp5 = xmalloc(p->n);
    uint8_t *planes[2] = {p->p0, p->p1};
    ts_planes_split_ex(TS_DT_FLOAT16, TS_PLANES_F16_EXP, src, p->n, planes);
    for (size_t i = 0; i < p->n; i++) p->exp5[i] = p->p0[i] >> 3;
    p->huf = xmalloc(p->nch * sizeof *p->huf);
    p->zst = xmalloc(p->nch * sizeof *p->zst);
    p->hexp = xmalloc(p->nch * sizeof *p->hexp);
    p->huf_size = xmalloc(p->nch * sizeof *p->huf_size);
    p->zst_size = xmalloc(p->nch * sizeof *p->zst_size);
    p->hexp_size = xmalloc(p->nch * sizeof *p->hexp_size);
    double entropy = 0, huf = 0, zst = 0, hexp = 0;
    for (size_t k = 0; k < p->nch; k++) {
        size_t m = chunk_len(p, k), cap = ZSTD_compressBound(m) + TS_HUF_HEADER + TS_HUF_SLACK + 64;
        uint64_t counts[256];
        ts_huf_count(p->p0 + k * CHUNK, m, counts);
        for (int s = 0; s < 256; s++)
            if (counts[s]) entropy -= (double)counts[s] * log2((double)counts[s] / (double)m);
        p->huf[k] = xmalloc(cap);
        p->zst[k] = xmalloc(cap);
        p->hexp[k] = xmalloc(cap);
        if (ts_huf_encode(p->p0 + k * CHUNK, m, p->huf[k], cap, cap, &p->huf_size[k]) ||
            ts_huf_encode(p->exp5 + k * CHUNK, m, p->hexp[k], cap, cap, &p->hexp_size[k])) {
            fprintf(stderr, "chunk %zu: fewer than 2 distinct symbols\n", k);
            return 1;
        }
        p->zst_size[k] = ZSTD_compress(p->zst[k], cap, p->p0 + k * CHUNK, m, 3);
        huf += (double)p->huf_size[k];
        zst += (double)p->zst_size[k];
        hexp += (double)p->hexp_size[k] + (double)(3 * m + 7) / 8;
    }
    double n = (double)p->n;
    printf("%zu float16 elements, %zu chunks of %zu\n", p->n, p->nch, CHUNK);
    printf("plane 0 bits per element: order-0 entropy per chunk %.4f | huffman (codec 3) %.4f | zstd-3 %.4f | "
           "exponent-only huffman + 3 packed bits %.4f\n",
           entropy / n, huf * 8 / n, zst * 8 / n, hexp * 8 / n);

    p->dst = xmalloc(2 * p->n);
    memset(p->dst, 1, 2 * p->n); /* paged in */
    p->scratch = xmalloc(CHUNK);
    p->dctx = ZSTD_createDCtx();
    struct {
        const char *name;
        phase_fn fn;
    } phases[] = {
        {"memcpy of the decoded size", ph_memcpy},
        {"XXH3 of the stored bytes (zstd plane 0 + plane 1)", ph_stored_hash},
        {"plane 0: zstd-3 decode", ph_zstd},
        {"plane 0: huffman decode", ph_huf},
        {"exponent-only plane: huffman decode", ph_huf_exp},
        {"regroup (merge) of planes 0 + 1", ph_merge},
        {"XXH3 of the decoded bytes", ph_decoded_hash},
    };
    printf("thread CPU time, best of %d (ms, ns per element):\n", repeats);
    for (size_t i = 0; i < sizeof phases / sizeof phases[0]; i++) {
        double t = best_of(p, phases[i].fn, repeats);
        printf("  %-52s %8.2f  %6.3f\n", phases[i].name, t * 1e3, t * 1e9 / n);
    }
    static const struct {
        const char *name;
        int codec, verify;
    } runs[] = {
        {"ts_run_jobs, plane 0 zstd, verify", TS_CODEC_ZSTD, 1},
        {"ts_run_jobs, plane 0 zstd, no verify", TS_CODEC_ZSTD, 0},
        {"ts_run_jobs, plane 0 huffman, verify", TS_CODEC_HUFFMAN, 1},
        {"ts_run_jobs, plane 0 huffman, no verify", TS_CODEC_HUFFMAN, 0},
    };
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        double t = run_jobs(p, src, runs[i].codec, runs[i].verify, repeats);
        printf("  %-52s %8.2f  %6.3f  (%.3f GB/s)\n", runs[i].name, t * 1e3, t * 1e9 / n, 2 * n / t / 1e9);
    }
    ZSTD_freeDCtx(p->dctx);
    return 0;
}
