#include "ts_weights.h"
#include "ts_codec.h"
#include "ts_planes.h"

#include <string.h>

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

static ts_status fail(ts_parse_error *e, ts_status s, uint32_t tensor, uint32_t chunk, const char *field,
                      uint64_t value, uint64_t limit)
{
    if (e) {
        e->tensor = tensor;
        e->chunk = chunk;
        e->field = field;
        e->value = value;
        e->limit = limit;
    }
    return s;
}

#define NONE UINT32_MAX

/* a + b, or fail on overflow */
static int add_ovf(uint64_t a, uint64_t b, uint64_t *r) { return __builtin_add_overflow(a, b, r); }
static int mul_ovf(uint64_t a, uint64_t b, uint64_t *r) { return __builtin_mul_overflow(a, b, r); }

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; } /* x < 2^57 here */

ts_status ts_parse_header(const uint8_t *b, size_t len, ts_header *h, ts_parse_error *e)
{
    if (len < TS_HEADER_SIZE) return fail(e, TS_E_TRUNCATED, NONE, NONE, "header", len, TS_HEADER_SIZE);
    if (memcmp(b, "TSWEIGHT", 8)) return fail(e, TS_E_MAGIC, NONE, NONE, "magic", 0, 0);
    h->major = rd16(b + 8);
    h->minor = rd16(b + 10);
    h->tensor_count = rd32(b + 12);
    h->index_size = rd64(b + 16);
    h->data_offset = rd64(b + 24);
    h->file_size = rd64(b + 32);
    h->index_checksum = rd64(b + 40);
    h->header_checksum = rd64(b + 48);
    if (h->major != 1) return fail(e, TS_E_VERSION, NONE, NONE, "major", h->major, 1);
    if (ts_xxh3(b, 48) != h->header_checksum)
        return fail(e, TS_E_CHECKSUM, NONE, NONE, "header_checksum", h->header_checksum, 0);
    h->features = rd64(b + 56);
    if (h->features & ~TS_KNOWN_FEATURES)
        return fail(e, TS_E_FIELD, NONE, NONE, "features", h->features & ~TS_KNOWN_FEATURES, TS_KNOWN_FEATURES);
    if (h->tensor_count > TS_MAX_TENSORS)
        return fail(e, TS_E_LIMIT, NONE, NONE, "tensor_count", h->tensor_count, TS_MAX_TENSORS);
    if (h->index_size > TS_MAX_INDEX_SIZE)
        return fail(e, TS_E_LIMIT, NONE, NONE, "index_size", h->index_size, TS_MAX_INDEX_SIZE);
    if (h->file_size > TS_MAX_FILE_SIZE)
        return fail(e, TS_E_LIMIT, NONE, NONE, "file_size", h->file_size, TS_MAX_FILE_SIZE);
    uint64_t want = align_up(TS_HEADER_SIZE + h->index_size, 4096);
    if (h->data_offset != want) return fail(e, TS_E_LAYOUT, NONE, NONE, "data_offset", h->data_offset, want);
    if (h->file_size < h->data_offset)
        return fail(e, TS_E_LAYOUT, NONE, NONE, "file_size", h->file_size, h->data_offset);
    return TS_OK;
}

ts_status ts_parse_index(const ts_header *h, const uint8_t *ix, size_t len, ts_tensor *ts,
                         ts_parse_error *e)
{
    if (len < h->index_size) return fail(e, TS_E_TRUNCATED, NONE, NONE, "index", len, h->index_size);
    len = (size_t)h->index_size;
    if (ts_xxh3(ix, len) != h->index_checksum)
        return fail(e, TS_E_CHECKSUM, NONE, NONE, "index_checksum", h->index_checksum, 0);
    uint64_t pos = 0, end_prev = h->data_offset;
#define NEED(nbytes, what)                                                                        \
    do {                                                                                          \
        if ((uint64_t)(nbytes) > len - pos)                                                       \
            return fail(e, TS_E_TRUNCATED, i, NONE, what, pos + (uint64_t)(nbytes), len);         \
    } while (0)
    for (uint32_t i = 0; i < h->tensor_count; i++) {
        ts_tensor *t = &ts[i];
        memset(t, 0, sizeof *t);
        NEED(2, "name_len");
        t->name_len = rd16(ix + pos);
        pos += 2;
        if (t->name_len < 1) return fail(e, TS_E_NAME, i, NONE, "name_len", 0, 1);
        if (t->name_len > TS_MAX_NAME_LEN)
            return fail(e, TS_E_LIMIT, i, NONE, "name_len", t->name_len, TS_MAX_NAME_LEN);
        NEED(t->name_len, "name");
        t->name_off = pos;
        if (memchr(ix + pos, 0, t->name_len)) return fail(e, TS_E_NAME, i, NONE, "name", 0, 0);
        pos += t->name_len;
        NEED(4, "dtype");
        t->dtype = ix[pos];
        t->encoding = ix[pos + 1];
        t->ndim = ix[pos + 2];
        uint8_t flags = ix[pos + 3];
        pos += 4;
        t->itemsize = (uint8_t)ts_dtype_size(t->dtype);
        if (!t->itemsize) return fail(e, TS_E_DTYPE, i, NONE, "dtype", t->dtype, 12);
        if (t->encoding > TS_ENC_PLANES) return fail(e, TS_E_ENCODING, i, NONE, "encoding", t->encoding, 1);
        if (t->ndim > TS_MAX_NDIM) return fail(e, TS_E_LIMIT, i, NONE, "ndim", t->ndim, TS_MAX_NDIM);
        if (flags) return fail(e, TS_E_FIELD, i, NONE, "flags", flags, 0);
        NEED(8u * t->ndim, "shape");
        /* the product of the dimensions with zeros counted as 1 ("extent") is capped, so an empty
         * tensor cannot declare dimensions whose strides overflow (order-independent) */
        uint64_t extent = 1;
        int empty = 0;
        for (unsigned d = 0; d < t->ndim; d++) {
            t->shape[d] = rd64(ix + pos + 8u * d);
            if (t->shape[d] > TS_MAX_DIM) return fail(e, TS_E_LIMIT, i, NONE, "shape", t->shape[d], TS_MAX_DIM);
            empty |= t->shape[d] == 0;
            if (t->shape[d] && (mul_ovf(extent, t->shape[d], &extent) || extent > TS_MAX_DIM))
                return fail(e, TS_E_LIMIT, i, NONE, "numel", extent, TS_MAX_DIM);
        }
        t->numel = empty ? 0 : extent;
        pos += 8u * t->ndim;
        NEED(24, "data_offset");
        t->data_offset = rd64(ix + pos);
        t->data_size = rd64(ix + pos + 8);
        t->chunk_elems = rd32(ix + pos + 16);
        t->chunk_count = rd32(ix + pos + 20);
        pos += 24;
        uint64_t raw_bytes = t->numel * t->itemsize; /* numel <= 2^48, itemsize <= 8 */
        if (t->chunk_elems == 0) return fail(e, TS_E_LAYOUT, i, NONE, "chunk_elems", 0, 1);
        if ((uint64_t)t->chunk_elems * t->itemsize > TS_MAX_CHUNK_BYTES)
            return fail(e, TS_E_LIMIT, i, NONE, "chunk_elems", t->chunk_elems,
                        TS_MAX_CHUNK_BYTES / t->itemsize);
        uint64_t want_chunks = (t->numel + t->chunk_elems - 1) / t->chunk_elems;
        if (t->chunk_count != want_chunks)
            return fail(e, TS_E_LAYOUT, i, NONE, "chunk_count", t->chunk_count, want_chunks);
        t->decoded_sums = t->encoding == TS_ENC_PLANES && (h->features & TS_FEAT_DECODED_CHECKSUMS);
        t->chunk_rec_size = t->encoding == TS_ENC_RAW ? 8u : 8u + 5u * t->itemsize + (t->decoded_sums ? 8u : 0u);
        NEED((uint64_t)t->chunk_count * t->chunk_rec_size, "chunks");
        t->chunks_off = pos;
        if (t->encoding == TS_ENC_RAW) {
            if (t->data_size != raw_bytes)
                return fail(e, TS_E_LAYOUT, i, NONE, "data_size", t->data_size, raw_bytes);
        } else {
            uint64_t total = 0;
            for (uint32_t k = 0; k < t->chunk_count; k++) {
                const uint8_t *r = ix + pos + (uint64_t)k * t->chunk_rec_size;
                uint64_t first = (uint64_t)k * t->chunk_elems;
                uint64_t n = t->numel - first < t->chunk_elems ? t->numel - first : t->chunk_elems;
                for (unsigned p = 0; p < t->itemsize; p++) {
                    uint8_t codec = r[5 * p];
                    uint32_t sz = rd32(r + 5 * p + 1);
                    if (codec > TS_CODEC_RANS) return fail(e, TS_E_CODEC, i, k, "codec", codec, 4);
                    if (sz > n) return fail(e, TS_E_LIMIT, i, k, "plane_size", sz, n);
                    if (codec == TS_CODEC_FILL && sz != 1) return fail(e, TS_E_LAYOUT, i, k, "plane_size", sz, 1);
                    if (codec == TS_CODEC_STORED && sz != n) return fail(e, TS_E_LAYOUT, i, k, "plane_size", sz, n);
                    if (sz == 0) return fail(e, TS_E_LAYOUT, i, k, "plane_size", 0, 1);
                    total += sz; /* <= numel * 8 < 2^52 */
                }
            }
            if (total != t->data_size)
                return fail(e, TS_E_LAYOUT, i, NONE, "data_size", t->data_size, total);
        }
        pos += (uint64_t)t->chunk_count * t->chunk_rec_size;
        uint64_t a = (t->encoding == TS_ENC_RAW && t->data_size >= 65536) ? 4096 : 64;
        uint64_t want_off = align_up(end_prev, a), end;
        if (t->data_offset != want_off)
            return fail(e, TS_E_LAYOUT, i, NONE, "data_offset", t->data_offset, want_off);
        if (add_ovf(t->data_offset, t->data_size, &end) || end > h->file_size)
            return fail(e, TS_E_LAYOUT, i, NONE, "data_size", t->data_size,
                        h->file_size > t->data_offset ? h->file_size - t->data_offset : 0);
        end_prev = end;
    }
    if (h->features & TS_FEAT_EXTENSIONS) {
        uint32_t prev_tag = 0, i = NONE;
        while (pos < len) {
            NEED(TS_EXT_RECORD_HEADER, "extension record");
            uint32_t tag = rd16(ix + pos), rlen = rd32(ix + pos + 2);
            if (tag == 0) return fail(e, TS_E_LAYOUT, NONE, NONE, "extension tag", 0, 1);
            if (tag <= prev_tag) return fail(e, TS_E_LAYOUT, NONE, NONE, "extension tag", tag, prev_tag + 1);
            pos += TS_EXT_RECORD_HEADER;
            NEED(rlen, "extension length");
            pos += rlen;
            prev_tag = tag;
        }
    }
#undef NEED
    if (pos != len) return fail(e, TS_E_LAYOUT, NONE, NONE, "index_size", len, pos);
    if (h->file_size != end_prev) return fail(e, TS_E_LAYOUT, NONE, NONE, "file_size", h->file_size, end_prev);
    return TS_OK;
}

void ts_get_chunk(const uint8_t *ix, const ts_tensor *t, uint32_t k, uint64_t offset, ts_chunk *c)
{
    const uint8_t *r = ix + t->chunks_off + (uint64_t)k * t->chunk_rec_size;
    uint64_t first = (uint64_t)k * t->chunk_elems;
    memset(c, 0, sizeof *c);
    c->offset = offset;
    c->n_elems = t->numel - first < t->chunk_elems ? t->numel - first : t->chunk_elems;
    if (t->encoding == TS_ENC_RAW) {
        c->size = c->n_elems * t->itemsize;
        c->checksum = rd64(r);
        return;
    }
    for (unsigned p = 0; p < t->itemsize; p++) {
        c->codecs[p] = r[5 * p];
        c->plane_sizes[p] = rd32(r + 5 * p + 1);
        c->size += c->plane_sizes[p];
    }
    c->checksum = rd64(r + 5u * t->itemsize);
    if (t->decoded_sums) {
        c->decoded_checksum = rd64(r + 5u * t->itemsize + 8u);
        c->has_decoded = 1;
    }
}
