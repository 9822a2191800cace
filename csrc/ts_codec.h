/* Chunk codec: encode a tensor into 'planes' chunks, decode / verify chunks straight into the
 * caller's destination memory on several threads. Caller-owned memory, no globals. */
#ifndef TS_CODEC_H
#define TS_CODEC_H
#include <stddef.h>
#include <stdint.h>
#include "ts_planes.h"
#include "ts_status.h"

enum { TS_ENC_RAW = 0, TS_ENC_PLANES = 1 };
enum { TS_CODEC_STORED = 0, TS_CODEC_FILL = 1, TS_CODEC_ZSTD = 2, TS_CODEC_HUFFMAN = 3, TS_CODEC_RANS = 4 };
/* Candidate codecs per mode (fill and stored are always candidates): HUFFMAN: huffman; ZSTD: zstd at
 * `level`; MAX: zstd at `level`, huffman and rans; RANS: huffman and rans. */
enum { TS_MODE_HUFFMAN = 0, TS_MODE_ZSTD = 1, TS_MODE_MAX = 2, TS_MODE_RANS = 3 };

uint64_t ts_xxh3(const void *p, size_t n);

/* One chunk to encode / that was encoded. */
typedef struct ts_chunk_out {
    uint64_t size;                      /* stored bytes of the chunk */
    uint64_t checksum;                  /* XXH3 of the stored bytes */
    uint8_t codecs[TS_MAX_PLANES];
    uint32_t plane_sizes[TS_MAX_PLANES];
} ts_chunk_out;

/* Encode numel elements of `dtype` at src as 'planes' chunks of chunk_elems elements.
 * dst must hold numel * itemsize bytes; the chunks are written back to back from dst[0] and
 * *out_size receives the total. chunks[] has ceil(numel / chunk_elems) entries. */
ts_status ts_encode_planes(unsigned dtype, const uint8_t *src, uint64_t numel, uint64_t chunk_elems,
                           int mode, int level, int threads, uint8_t *dst, uint64_t *out_size,
                           ts_chunk_out *chunks);

/* XXH3 of each chunk_bytes slice of src (n bytes), on several threads. */
ts_status ts_checksum_chunks(const uint8_t *src, uint64_t n, uint64_t chunk_bytes, int threads,
                             uint64_t *out);

/* One chunk to verify and/or decode. dst == NULL: verify only.
 * plane_stride == 0: the chunk's elements are decoded and regrouped into dst (n_elems * itemsize bytes).
 * plane_stride != 0 ('planes' encoding only): the planes are decoded but NOT regrouped: plane p's n_elems
 * bytes go to dst + p * plane_stride (plane_stride >= n_elems, else TS_E_ARG), so a device can regroup
 * them; dst then spans (itemsize - 1) * plane_stride + n_elems bytes. A 'raw' job with a non-zero
 * plane_stride is TS_E_ARG. */
typedef struct ts_chunk_job {
    const uint8_t *src;
    uint64_t src_size;
    uint8_t *dst;            /* n_elems * itemsize bytes, or NULL */
    uint64_t n_elems;
    uint64_t checksum;
    uint8_t dtype;
    uint8_t encoding;
    uint8_t verify;
    uint8_t codecs[TS_MAX_PLANES];
    uint32_t plane_sizes[TS_MAX_PLANES];
    uint64_t plane_stride;   /* 0: regroup into dst; else: planes to dst + p * plane_stride, unmerged */
} ts_chunk_job;

/* Run every job on up to `threads` threads. On failure returns the status of the failing job with
 * the lowest index and stores that index in *failed. With statuses == NULL the run stops early after
 * a failure (later jobs may not run); otherwise every job runs and statuses[i] receives its status. */
ts_status ts_run_jobs(const ts_chunk_job *jobs, size_t njobs, int threads, size_t *failed,
                      ts_status *statuses);

/* Decode / verify one job with caller-provided scratch (max(codec'd plane bytes) * planes); used by
 * fuzzers. scratch_size must be >= n_elems * itemsize. */
ts_status ts_run_job(const ts_chunk_job *job, uint8_t *scratch, size_t scratch_size, void *zstd_dctx);

#endif
