#include "tsw_build.h"

#include <stdlib.h>
#include <string.h>

#include "../ts_codec.h"
#include "../ts_planes.h"

uint64_t tb_align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
void tb_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
void tb_put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
void tb_put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
uint16_t tb_get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
uint32_t tb_get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
uint64_t tb_get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

typedef struct {
    uint8_t *p;
    size_t n, cap;
} growbuf;

static int gb_reserve(growbuf *b, size_t more)
{
    if (b->n + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + more) cap *= 2;
    uint8_t *q = realloc(b->p, cap);
    if (!q) return -1;
    b->p = q;
    b->cap = cap;
    return 0;
}

static int gb_put(growbuf *b, const void *src, size_t n)
{
    if (gb_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->n, src, n);
    b->n += n;
    return 0;
}

static int gb_u8(growbuf *b, uint8_t v) { return gb_put(b, &v, 1); }
static int gb_u16(growbuf *b, uint16_t v) { uint8_t t[2]; tb_put16(t, v); return gb_put(b, t, 2); }
static int gb_u32(growbuf *b, uint32_t v) { uint8_t t[4]; tb_put32(t, v); return gb_put(b, t, 4); }
static int gb_u64(growbuf *b, uint64_t v) { uint8_t t[8]; tb_put64(t, v); return gb_put(b, t, 8); }

typedef struct {
    uint8_t *stored;     /* stored data bytes */
    uint64_t stored_size;
    ts_chunk_out *chunks; /* planes */
    uint64_t *sums;       /* raw */
} enc_t;

int tb_build(const tb_tensor *t, unsigned n, tb_file *f)
{
    memset(f, 0, sizeof *f);
    if (n > TB_MAX_TENSORS) return -1;
    enc_t enc[TB_MAX_TENSORS];
    memset(enc, 0, sizeof enc);
    growbuf ix = {0};
    int rc = -1;
    f->ntensors = n;
    for (unsigned i = 0; i < n; i++) {
        tb_rec *r = &f->rec[i];
        unsigned isz = ts_dtype_size(t[i].dtype);
        if (!isz || !t[i].chunk_elems || t[i].ndim > 8) goto out;
        uint64_t numel = 1;
        for (unsigned d = 0; d < t[i].ndim; d++) numel *= t[i].shape[d];
        uint64_t nchunks = (numel + t[i].chunk_elems - 1) / t[i].chunk_elems;
        r->numel = numel;
        r->itemsize = isz;
        r->nchunks = (uint32_t)nchunks;
        if (t[i].encoding == 0) {
            enc[i].stored_size = numel * isz;
            enc[i].stored = malloc(enc[i].stored_size + 1);
            enc[i].sums = malloc((nchunks + 1) * sizeof(uint64_t));
            if (!enc[i].stored || !enc[i].sums) goto out;
            if (numel) memcpy(enc[i].stored, t[i].data, enc[i].stored_size);
            for (uint64_t k = 0; k < nchunks; k++) {
                uint64_t first = k * t[i].chunk_elems;
                uint64_t nk = numel - first < t[i].chunk_elems ? numel - first : t[i].chunk_elems;
                enc[i].sums[k] = ts_xxh3(enc[i].stored + first * isz, nk * isz);
            }
            r->chunk_rec_size = 8;
        } else {
            enc[i].stored = malloc(numel * isz + 1);
            enc[i].chunks = calloc(nchunks + 1, sizeof(ts_chunk_out));
            if (!enc[i].stored || !enc[i].chunks) goto out;
            if (ts_encode_planes(t[i].dtype, t[i].data, numel, t[i].chunk_elems, t[i].mode, t[i].level, 2,
                                 enc[i].stored, &enc[i].stored_size, enc[i].chunks) != TS_OK)
                goto out;
            r->chunk_rec_size = 8 + 5 * isz;
        }
        size_t name_len = t[i].name_len ? t[i].name_len : strlen(t[i].name);
        r->rec = ix.n;
        if (gb_u16(&ix, (uint16_t)name_len)) goto out;
        r->name = ix.n;
        if (gb_put(&ix, t[i].name, name_len)) goto out;
        r->dtype = ix.n;
        r->encoding = ix.n + 1;
        r->ndim = ix.n + 2;
        r->flags = ix.n + 3;
        if (gb_u8(&ix, (uint8_t)t[i].dtype) || gb_u8(&ix, (uint8_t)t[i].encoding) ||
            gb_u8(&ix, (uint8_t)t[i].ndim) || gb_u8(&ix, 0))
            goto out;
        r->shape = ix.n;
        for (unsigned d = 0; d < t[i].ndim; d++)
            if (gb_u64(&ix, t[i].shape[d])) goto out;
        r->data_offset = ix.n;
        r->data_size = ix.n + 8;
        r->chunk_elems = ix.n + 16;
        r->chunk_count = ix.n + 20;
        if (gb_u64(&ix, 0) || gb_u64(&ix, enc[i].stored_size) || gb_u32(&ix, t[i].chunk_elems) ||
            gb_u32(&ix, (uint32_t)nchunks))
            goto out;
        r->chunks = ix.n;
        for (uint64_t k = 0; k < nchunks; k++) {
            if (t[i].encoding == 0) {
                if (gb_u64(&ix, enc[i].sums[k])) goto out;
            } else {
                for (unsigned p = 0; p < isz; p++)
                    if (gb_u8(&ix, enc[i].chunks[k].codecs[p]) || gb_u32(&ix, enc[i].chunks[k].plane_sizes[p]))
                        goto out;
                if (gb_u64(&ix, enc[i].chunks[k].checksum)) goto out;
            }
        }
    }
    f->index_size = ix.n;
    f->data_offset = tb_align_up(64 + ix.n, 4096);
    uint64_t end = f->data_offset;
    for (unsigned i = 0; i < n; i++) {
        uint64_t a = (t[i].encoding == 0 && enc[i].stored_size >= 65536) ? 4096 : 64;
        f->rec[i].file_offset = tb_align_up(end, a);
        f->rec[i].file_size = enc[i].stored_size;
        tb_put64(ix.p + f->rec[i].data_offset, f->rec[i].file_offset);
        end = f->rec[i].file_offset + enc[i].stored_size;
    }
    f->size = end;
    f->buf = calloc(1, f->size);
    if (!f->buf) goto out;
    memcpy(f->buf, "TSWEIGHT", 8);
    tb_put16(f->buf + 8, 1);
    tb_put16(f->buf + 10, 0);
    tb_put32(f->buf + 12, n);
    tb_put64(f->buf + 16, f->index_size);
    tb_put64(f->buf + 24, f->data_offset);
    tb_put64(f->buf + 32, f->size);
    if (ix.n) memcpy(f->buf + 64, ix.p, ix.n);
    for (unsigned i = 0; i < n; i++)
        if (enc[i].stored_size) memcpy(f->buf + f->rec[i].file_offset, enc[i].stored, enc[i].stored_size);
    tb_seal(f);
    rc = 0;
out:
    for (unsigned i = 0; i < n && i < TB_MAX_TENSORS; i++) {
        free(enc[i].stored);
        free(enc[i].chunks);
        free(enc[i].sums);
    }
    free(ix.p);
    if (rc) tb_free(f);
    return rc;
}

void tb_copy(const tb_file *src, tb_file *dst)
{
    *dst = *src;
    dst->buf = malloc(src->size);
    if (!dst->buf) abort();
    memcpy(dst->buf, src->buf, src->size);
}

void tb_free(tb_file *f)
{
    free(f->buf);
    f->buf = NULL;
    f->size = 0;
}

void tb_seal_header(uint8_t *hdr) { tb_put64(hdr + 48, ts_xxh3(hdr, 48)); }

void tb_seal(tb_file *f)
{
    uint64_t isz = tb_get64(f->buf + 16);
    if (f->size >= 64 && isz <= f->size - 64) tb_put64(f->buf + 40, ts_xxh3(f->buf + 64, (size_t)isz));
    tb_seal_header(f->buf);
}
