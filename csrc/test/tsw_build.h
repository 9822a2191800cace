/* Builds tinyserve weights files in memory, from docs/format.md alone (tests and corpus generator).
 * It records where every field of every tensor record sits, so tests can corrupt one field and
 * re-seal the checksums. */
#ifndef TSW_BUILD_H
#define TSW_BUILD_H
#include <stddef.h>
#include <stdint.h>

#define TB_MAX_TENSORS 16

typedef struct tb_tensor {
    const char *name;    /* name bytes, strlen(name) of them unless name_len != 0 */
    unsigned name_len;
    unsigned dtype;      /* format.md dtype code */
    unsigned encoding;   /* 0 raw, 1 planes */
    unsigned ndim;
    uint64_t shape[8];
    uint32_t chunk_elems;
    const uint8_t *data; /* numel * itemsize bytes, little-endian elements */
    int mode, level;     /* planes: ts_encode_planes mode / zstd level */
} tb_tensor;

/* offsets inside the index (not the file) of one tensor record's fields */
typedef struct tb_rec {
    size_t rec, name, dtype, encoding, ndim, flags, shape, data_offset, data_size, chunk_elems,
        chunk_count, chunks;
    uint32_t chunk_rec_size, nchunks;
    uint64_t numel, itemsize, file_offset, file_size; /* where the data sits in the file */
} tb_rec;

typedef struct tb_file {
    uint8_t *buf;        /* whole file */
    size_t size;
    uint64_t index_size, data_offset;
    unsigned ntensors;
    tb_rec rec[TB_MAX_TENSORS];
} tb_file;

uint64_t tb_align_up(uint64_t x, uint64_t a);
void tb_put16(uint8_t *p, uint16_t v);
void tb_put32(uint8_t *p, uint32_t v);
void tb_put64(uint8_t *p, uint64_t v);
uint16_t tb_get16(const uint8_t *p);
uint32_t tb_get32(const uint8_t *p);
uint64_t tb_get64(const uint8_t *p);

/* Build a valid file. Returns 0 on success. */
int tb_build(const tb_tensor *t, unsigned n, tb_file *f);
/* Deep copy of a built file. */
void tb_copy(const tb_file *src, tb_file *dst);
void tb_free(tb_file *f);
/* Recompute index_checksum (over the header's index_size bytes, when they lie in the buffer) and
 * header_checksum. */
void tb_seal(tb_file *f);
/* Re-seal only the header checksum. */
void tb_seal_header(uint8_t *hdr);
static inline uint8_t *tb_index(tb_file *f) { return f->buf + 64; }

#endif
