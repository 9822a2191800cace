/* Chunk codec: encode a tensor into 'planes' chunks, decode / verify chunks straight into the
 * caller's destination memory on several threads. Caller-owned memory, no globals. */
#ifndef TS_CODEC_H
#define TS_CODEC_H
#include <stddef.h>
#include <stdint.h>
#include "ts_planes.h"
#include "ts_rules.h"
#include "ts_status.h"

enum { TS_ENC_RAW = 0, TS_ENC_PLANES = 1 };
enum { TS_CODEC_STORED = 0, TS_CODEC_FILL = 1, TS_CODEC_ZSTD = 2, TS_CODEC_HUFFMAN = 3, TS_CODEC_RANS = 4 };
/* Candidate codecs per mode (fill and stored are always candidates): HUFFMAN: huffman; ZSTD: zstd at
 * `level`; MAX: zstd at `level`, huffman and rans; RANS: huffman and rans; ZSTD_HUFFMAN: zstd at `level`
 * and huffman. */
enum { TS_MODE_HUFFMAN = 0, TS_MODE_ZSTD = 1, TS_MODE_MAX = 2, TS_MODE_RANS = 3, TS_MODE_ZSTD_HUFFMAN = 4 };

uint64_t ts_xxh3(const void *p, size_t n);

/* Version of the libzstd this code runs on (ZSTD_versionNumber(): major * 10000 + minor * 100 + patch). */
unsigned ts_zstd_version(void);

/* Check the frame rules of codec 2 (docs/format.md section 5) on a stream of sz bytes that must decode
 * to n bytes: exactly one Zstandard frame (magic 0xFD2FB528), no reserved bit, no dictionary, a declared
 * content size equal to n, every block within Block_Maximum_Size and the stream, nothing after the
 * frame. Walks headers only (no decoding). */
ts_status ts_zstd_check_frame(const uint8_t *s, uint64_t sz, uint64_t n, ts_codec_error *err);

/* Decode one plane stream of sz bytes with `codec` into exactly n bytes at d (tests, fuzzers, the
 * differential test): the stream rules of sections 5-7 only, without the chunk's 1 <= sz <= n rule. */
ts_status ts_decode_stream(uint8_t codec, const uint8_t *s, uint64_t sz, uint8_t *d, size_t n, ts_codec_error *err);

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
/* The same with plane-order flags (TS_PLANES_F16_EXP). */
ts_status ts_encode_planes_ex(unsigned dtype, unsigned flags, const uint8_t *src, uint64_t numel,
                              uint64_t chunk_elems, int mode, int level, int threads, uint8_t *dst,
                              uint64_t *out_size, ts_chunk_out *chunks);

/* XXH3 of each chunk_bytes slice of src (n bytes), on several threads. */
ts_status ts_checksum_chunks(const uint8_t *src, uint64_t n, uint64_t chunk_bytes, int threads,
                             uint64_t *out);

/* Job flags. TS_JOB_F16_EXP: float16 planes are in the exponent-planes order (= TS_PLANES_F16_EXP).
 * TS_JOB_VALIDATE (with dst == NULL): decode (and regroup) the chunk into the worker's scratch and
 * discard it, so every codec rule and the decoded checksum are checked without a destination. */
enum { TS_JOB_F16_EXP = 1, TS_JOB_VALIDATE = 2 };

/* One chunk to verify and/or decode. dst == NULL: verify only (unless TS_JOB_VALIDATE).
 * Every job first checks the chunk's structure (codecs known, 1 <= plane size <= n_elems, stored == n,
 * fill == 1, plane sizes sum to src_size; raw: src_size == n_elems * itemsize), then the checksum of the
 * stored bytes (verify), then decodes. err (optional) receives the broken rule and its plane.
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
    /* (weights format 1.1, feature bit 0) with verify and has_decoded, the decoded element bytes
     * (after regrouping; an unmerged job regroups into scratch to check) must hash to
     * decoded_checksum, else TS_E_DECODED_CHECKSUM */
    uint64_t decoded_checksum;
    uint8_t has_decoded;
    uint8_t flags;           /* TS_JOB_* (codecs, F2) */
    ts_codec_error *err;     /* NULL, or where the broken rule and its plane are reported */
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
