/* libFuzzer target: a weights file prefix.
 * ts_parse_header on the input; when it passes, ts_parse_index on the bytes after the header; when
 * that passes, every chunk is walked with ts_get_chunk (checking the placement invariants the parser
 * promises) and the chunks whose bytes lie inside the input are verified and decoded with
 * ts_run_job into destinations of exactly n_elems * itemsize bytes (and once more through
 * ts_run_jobs, which must agree job by job).
 * Each input is run as given and again with its header and index checksums repaired, so that
 * mutations reach the index and the chunk decoders. */
#include <zstd.h>

#include "../ts_codec.h"
#include "../ts_planes.h"
#include "../ts_weights.h"
#include "fuzz_common.h"

#define DECODE_BUDGET (64ull << 20) /* decoded bytes per input, keeps every run fast */
#define MAX_JOBS 4096

static ts_tensor g_tensors[TS_MAX_TENSORS];
static ZSTD_DCtx *g_dctx;

static int allowed_status(ts_status st, int raw)
{
    if (st == TS_OK || st == TS_E_CHECKSUM) return 1;
    return !raw && st == TS_E_CORRUPT; /* a validated index leaves only bad streams */
}

static void run(const uint8_t *buf, size_t size)
{
    ts_header h;
    ts_parse_error e;
    memset(&e, 0, sizeof e);
    ts_status st = ts_parse_header(buf, size, &h, &e);
    if (st != TS_OK) {
        FUZZ_ASSERT(e.field != NULL);
        return;
    }
    FUZZ_ASSERT(size >= TS_HEADER_SIZE && h.major == 1);
    FUZZ_ASSERT(h.tensor_count <= TS_MAX_TENSORS && h.index_size <= TS_MAX_INDEX_SIZE);
    FUZZ_ASSERT(h.data_offset == (TS_HEADER_SIZE + h.index_size + 4095) / 4096 * 4096);
    FUZZ_ASSERT(h.file_size >= h.data_offset && h.file_size <= TS_MAX_FILE_SIZE);
    const uint8_t *ix = buf + TS_HEADER_SIZE;
    st = ts_parse_index(&h, ix, size - TS_HEADER_SIZE, g_tensors, &e);
    if (st != TS_OK) {
        FUZZ_ASSERT(e.field != NULL);
        return;
    }
    FUZZ_ASSERT(size - TS_HEADER_SIZE >= h.index_size);

    static ts_chunk_job jobs[MAX_JOBS];
    static ts_status solo[MAX_JOBS], multi[MAX_JOBS];
    size_t njobs = 0;
    uint64_t budget = DECODE_BUDGET, end_prev = h.data_offset;
    size_t scratch_cap = 0;
    uint8_t *scratch = NULL;
    for (uint32_t i = 0; i < h.tensor_count; i++) {
        const ts_tensor *t = &g_tensors[i];
        FUZZ_ASSERT(t->itemsize == ts_dtype_size(t->dtype) && t->itemsize);
        FUZZ_ASSERT(t->encoding <= TS_ENC_PLANES && t->ndim <= TS_MAX_NDIM);
        FUZZ_ASSERT(t->name_len >= 1 && t->name_len <= TS_MAX_NAME_LEN);
        FUZZ_ASSERT(t->name_off + t->name_len <= h.index_size);
        FUZZ_ASSERT(!memchr(ix + t->name_off, 0, t->name_len));
        /* format.md 3: every partial product, left to right, is <= 2^48 */
        uint64_t numel = 1;
        for (unsigned d = 0; d < t->ndim; d++) {
            FUZZ_ASSERT(t->shape[d] <= TS_MAX_DIM);
            FUZZ_ASSERT(!__builtin_mul_overflow(numel, t->shape[d], &numel) && numel <= TS_MAX_DIM);
        }
        FUZZ_ASSERT(t->numel == numel);
        FUZZ_ASSERT(t->chunk_elems >= 1 && (uint64_t)t->chunk_elems * t->itemsize <= TS_MAX_CHUNK_BYTES);
        FUZZ_ASSERT(t->chunk_count == (t->numel + t->chunk_elems - 1) / t->chunk_elems);
        FUZZ_ASSERT(t->data_offset >= end_prev && t->data_offset % 64 == 0 && t->data_offset - end_prev < 4096);
        if (t->encoding == TS_ENC_RAW) FUZZ_ASSERT(t->data_size == t->numel * t->itemsize);
        else FUZZ_ASSERT(t->data_size <= t->numel * t->itemsize);
        FUZZ_ASSERT(t->chunks_off + (uint64_t)t->chunk_count * t->chunk_rec_size <= h.index_size);
        uint64_t off = t->data_offset, elems = 0;
        for (uint32_t k = 0; k < t->chunk_count; k++) {
            ts_chunk c;
            ts_get_chunk(ix, t, k, off, &c);
            FUZZ_ASSERT(c.offset == off && c.n_elems >= 1 && c.n_elems <= t->chunk_elems);
            elems += c.n_elems;
            if (t->encoding == TS_ENC_PLANES) {
                uint64_t sum = 0;
                for (unsigned p = 0; p < t->itemsize; p++) {
                    FUZZ_ASSERT(c.codecs[p] <= TS_CODEC_RANS && c.plane_sizes[p] <= c.n_elems);
                    FUZZ_ASSERT(c.plane_sizes[p] >= 1);
                    sum += c.plane_sizes[p];
                }
                FUZZ_ASSERT(sum == c.size);
            } else {
                FUZZ_ASSERT(c.size == c.n_elems * t->itemsize);
            }
            off += c.size;
            uint64_t nbytes = c.n_elems * t->itemsize;
            if (c.offset + c.size > size || nbytes > budget || njobs == MAX_JOBS) continue;
            budget -= nbytes;
            ts_chunk_job *j = &jobs[njobs];
            memset(j, 0, sizeof *j);
            j->src = buf + c.offset;
            j->src_size = c.size;
            j->dst = fz_malloc((size_t)nbytes);
            j->n_elems = c.n_elems;
            j->checksum = c.checksum;
            j->dtype = t->dtype;
            j->encoding = t->encoding;
            j->verify = 1;
            memcpy(j->codecs, c.codecs, sizeof j->codecs);
            memcpy(j->plane_sizes, c.plane_sizes, sizeof j->plane_sizes);
            if (nbytes > scratch_cap) {
                free(scratch);
                scratch = fz_malloc((size_t)nbytes);
                scratch_cap = (size_t)nbytes;
            }
            /* verify on; when only the checksum is wrong decode anyway */
            ts_status s1 = ts_run_job(j, scratch, (size_t)nbytes, g_dctx);
            FUZZ_ASSERT(allowed_status(s1, t->encoding == TS_ENC_RAW));
            if (s1 == TS_E_CHECKSUM) {
                j->verify = 0;
                s1 = ts_run_job(j, scratch, (size_t)nbytes, g_dctx);
                FUZZ_ASSERT(s1 != TS_E_CHECKSUM && allowed_status(s1, t->encoding == TS_ENC_RAW));
            }
            solo[njobs++] = s1;
        }
        FUZZ_ASSERT(elems == t->numel);
        FUZZ_ASSERT(off == t->data_offset + t->data_size);
        end_prev = off;
    }
    FUZZ_ASSERT(end_prev == h.file_size);
    if (njobs) {
        size_t failed = (size_t)-1;
        ts_status all = ts_run_jobs(jobs, njobs, 1 + (int)(njobs % 3), &failed, multi);
        size_t first = (size_t)-1;
        for (size_t k = 0; k < njobs; k++) {
            FUZZ_ASSERT(multi[k] == solo[k]);
            if (solo[k] && first == (size_t)-1) first = k;
        }
        if (first == (size_t)-1) {
            FUZZ_ASSERT(all == TS_OK);
        } else {
            FUZZ_ASSERT(all == solo[first] && failed == first);
        }
    }
    for (size_t k = 0; k < njobs; k++) free(jobs[k].dst);
    free(scratch);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_dctx) g_dctx = ZSTD_createDCtx();
    run(data, size);
    if (size >= TS_HEADER_SIZE) {
        uint8_t *c = fz_malloc(size);
        memcpy(c, data, size);
        uint64_t isz = fz_rd64(c + 16);
        if (isz <= size - TS_HEADER_SIZE) fz_wr64(c + 40, ts_xxh3(c + TS_HEADER_SIZE, (size_t)isz));
        fz_wr64(c + 48, ts_xxh3(c, 48));
        if (memcmp(c, data, TS_HEADER_SIZE)) run(c, size);
        free(c);
    }
    return 0;
}
