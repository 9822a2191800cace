# Declarations of csrc/ used by _core.pyx.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "ts_status.h":
    ctypedef enum ts_status:
        TS_OK
        TS_E_TRUNCATED
        TS_E_MAGIC
        TS_E_VERSION
        TS_E_LIMIT
        TS_E_OVERFLOW
        TS_E_LAYOUT
        TS_E_DTYPE
        TS_E_ENCODING
        TS_E_CODEC
        TS_E_CHECKSUM
        TS_E_CORRUPT
        TS_E_DST_SIZE
        TS_E_NOMEM
        TS_E_ARG
        TS_E_NAME
        TS_E_FIELD
        TS_E_DECODED_CHECKSUM
    const char *ts_strstatus(ts_status s)

cdef extern from "ts_planes.h":
    unsigned ts_dtype_size(unsigned dtype)

cdef extern from "ts_rules.h":
    ctypedef struct ts_codec_error:
        uint32_t rule
        uint32_t plane
        uint64_t a, b, c

cdef extern from "ts_codec.h":
    enum:
        TS_JOB_F16_EXP
        TS_JOB_VALIDATE
    ctypedef struct ts_chunk_out:
        uint64_t size
        uint64_t checksum
        uint8_t codecs[8]
        uint32_t plane_sizes[8]
    ctypedef struct ts_chunk_job:
        const uint8_t *src
        uint64_t src_size
        uint8_t *dst
        uint64_t n_elems
        uint64_t checksum
        uint8_t dtype
        uint8_t encoding
        uint8_t verify
        uint8_t codecs[8]
        uint32_t plane_sizes[8]
        uint64_t plane_stride
        uint64_t decoded_checksum
        uint8_t has_decoded
        uint8_t flags
        ts_codec_error *err
    uint64_t ts_xxh3(const void *p, size_t n) nogil
    ts_status ts_encode_planes(unsigned dtype, const uint8_t *src, uint64_t numel, uint64_t chunk_elems,
                               int mode, int level, int threads, uint8_t *dst, uint64_t *out_size,
                               ts_chunk_out *chunks) nogil
    ts_status ts_encode_planes_ex(unsigned dtype, unsigned flags, const uint8_t *src, uint64_t numel,
                                  uint64_t chunk_elems, int mode, int level, int threads, uint8_t *dst,
                                  uint64_t *out_size, ts_chunk_out *chunks) nogil
    unsigned ts_zstd_version()
    ts_status ts_decode_stream(uint8_t codec, const uint8_t *s, uint64_t sz, uint8_t *d, size_t n,
                               ts_codec_error *err) nogil
    ts_status ts_checksum_chunks(const uint8_t *src, uint64_t n, uint64_t chunk_bytes, int threads,
                                 uint64_t *out) nogil
    ts_status ts_run_jobs(const ts_chunk_job *jobs, size_t njobs, int threads, size_t *failed,
                          ts_status *statuses) nogil

cdef extern from "ts_weights.h":
    ctypedef struct ts_header:
        uint16_t major, minor
        uint32_t tensor_count
        uint64_t index_size, data_offset, file_size, index_checksum, header_checksum
        uint64_t features
    ctypedef struct ts_tensor:
        uint64_t name_off
        uint32_t name_len
        uint8_t dtype, encoding, ndim, itemsize
        uint64_t shape[8]
        uint64_t numel
        uint64_t data_offset, data_size
        uint32_t chunk_elems, chunk_count
        uint64_t chunks_off
        uint32_t chunk_rec_size
        uint8_t decoded_sums
    ctypedef struct ts_chunk:
        uint64_t offset, size, checksum, n_elems
        uint8_t codecs[8]
        uint32_t plane_sizes[8]
        uint64_t decoded_checksum
        uint8_t has_decoded
    ctypedef struct ts_parse_error:
        uint32_t tensor, chunk
        const char *field
        uint64_t value, limit
    ts_status ts_parse_header(const uint8_t *buf, size_t len, ts_header *h, ts_parse_error *err) nogil
    ts_status ts_parse_index(const ts_header *h, const uint8_t *index, size_t len, ts_tensor *tensors,
                             ts_parse_error *err) nogil
    void ts_get_chunk(const uint8_t *index, const ts_tensor *t, uint32_t k, uint64_t offset, ts_chunk *c) nogil
