/* Parse and validate the header and index of a weights file (docs/format.md sections 2-4).
 * Nothing here trusts a length before checking it against the documented caps. */
#ifndef TS_WEIGHTS_H
#define TS_WEIGHTS_H
#include <stddef.h>
#include <stdint.h>
#include "ts_status.h"

#define TS_HEADER_SIZE 64
#define TS_MAX_TENSORS 65536u
#define TS_MAX_INDEX_SIZE (64ull << 20)
#define TS_MAX_NAME_LEN 1024u
#define TS_MAX_NDIM 8u
#define TS_MAX_DIM (1ull << 48)
#define TS_MAX_CHUNK_BYTES (16ull << 20)
#define TS_MAX_FILE_SIZE (1ull << 56)

/* The header's features bitmask (bytes 56..63; "reserved", always 0, in format 1.0). Every bit is a
 * REQUIRED feature: a file with a bit this reader does not know is refused (TS_E_FIELD, "features"). */
#define TS_FEAT_DECODED_CHECKSUMS (1ull << 0) /* 'planes' chunk records end with XXH3_64 of the decoded bytes */
#define TS_FEAT_EXTENSIONS (1ull << 1)        /* extension records follow the tensor records in the index */
#define TS_FEAT_FLOAT16_PLANES (1ull << 2)    /* float16 'planes' tensors use the float16 exponent mapping */
#define TS_KNOWN_FEATURES (TS_FEAT_DECODED_CHECKSUMS | TS_FEAT_EXTENSIONS | TS_FEAT_FLOAT16_PLANES)
#define TS_EXT_RECORD_HEADER 6u /* u16 tag, u32 length */

typedef struct ts_header {
    uint16_t major, minor;
    uint32_t tensor_count;
    uint64_t index_size, data_offset, file_size, index_checksum, header_checksum;
    uint64_t features;
} ts_header;

typedef struct ts_tensor {
    uint64_t name_off;   /* offset of the name bytes inside the index */
    uint32_t name_len;
    uint8_t dtype, encoding, ndim, itemsize;
    uint64_t shape[8];
    uint64_t numel;
    uint64_t data_offset, data_size;
    uint32_t chunk_elems, chunk_count;
    uint64_t chunks_off; /* offset of the first chunk record inside the index */
    uint32_t chunk_rec_size;
    uint8_t decoded_sums; /* planes chunk records carry a decoded checksum (TS_FEAT_DECODED_CHECKSUMS) */
} ts_tensor;

typedef struct ts_chunk {
    uint64_t offset, size, checksum;
    uint64_t n_elems;
    uint8_t codecs[8];
    uint32_t plane_sizes[8];
    uint64_t decoded_checksum; /* valid when has_decoded */
    uint8_t has_decoded;
} ts_chunk;

/* Where parsing stopped and why: tensor / chunk index (or UINT32_MAX), the field, value and limit. */
typedef struct ts_parse_error {
    uint32_t tensor, chunk;
    const char *field;
    uint64_t value, limit;
} ts_parse_error;

ts_status ts_parse_header(const uint8_t *buf, size_t len, ts_header *h, ts_parse_error *err);

/* Validate the whole index (index_size bytes) and fill tensors[h->tensor_count]. Checks records,
 * limits, overflow, codecs and sizes, placement (alignment, no holes, no overlaps), that file_size
 * is the end of the last tensor and, with TS_FEAT_EXTENSIONS, the extension records after the last
 * tensor record (tag != 0, tags strictly ascending, each length within the index, the records
 * exactly filling it). Does not check padding bytes or chunk checksums. */
ts_status ts_parse_index(const ts_header *h, const uint8_t *index, size_t len, ts_tensor *tensors,
                         ts_parse_error *err);

/* Chunk k of a tensor whose index was validated by ts_parse_index; `offset` is where the chunk starts
 * (the tensor's data_offset plus the sizes of chunks 0..k-1; iterate k upwards). */
void ts_get_chunk(const uint8_t *index, const ts_tensor *t, uint32_t k, uint64_t offset, ts_chunk *c);

#endif
