/* libFuzzer target: one chunk / plane stream.
 *   byte 0      dtype selector (1 + b % 12)
 *   byte 1      codec and mode selector
 *   bytes 2..3  n, the plane's decoded length (u16)
 *   bytes 4..   the plane stream
 * The stream goes to ts_huf_decode and ts_rans_decode (n bytes, exact buffers; a stream that decodes is
 * re-encoded and must decode back), and to ts_run_job / ts_run_jobs as plane 0 of a 'planes' chunk
 * (codec from byte 1: stored/fill/zstd/huffman/rans/unknown, the other planes fill), whose result must
 * agree with the direct decoders. Finally the whole input, read as a tensor of the chosen dtype, is
 * encoded with ts_encode_planes and every chunk must verify and decode back to it. */
#include <zstd.h>

#include "../ts_codec.h"
#include "../ts_huff.h"
#include "../ts_planes.h"
#include "../ts_rans.h"
#include "fuzz_common.h"

static ZSTD_DCtx *g_dctx;

static int distinct_at_least_2(const uint8_t *p, size_t n)
{
    for (size_t i = 1; i < n; i++)
        if (p[i] != p[0]) return 1;
    return 0;
}

/* decoded bytes -> encode -> decode must give them back */
static void reencode_huf(const uint8_t *plain, size_t n)
{
    if (!distinct_at_least_2(plain, n)) return;
    uint64_t counts[256];
    uint8_t lens[256];
    ts_huf_count(plain, n, counts);
    FUZZ_ASSERT(ts_huf_lengths(counts, lens) >= 2);
    uint64_t want = ts_huf_size(plain, n, lens);
    size_t cap = (size_t)want + TS_HUF_SLACK, sz = 0;
    uint8_t *enc = fz_malloc(cap), *back = fz_malloc(n);
    FUZZ_ASSERT(ts_huf_encode(plain, n, enc, cap, (size_t)want, &sz) == TS_OK && sz == want);
    FUZZ_ASSERT(ts_huf_decode(enc, sz, back, n) == TS_OK);
    FUZZ_ASSERT(memcmp(back, plain, n) == 0);
    free(enc);
    free(back);
}

static void reencode_rans(const uint8_t *plain, size_t n)
{
    if (!n || !distinct_at_least_2(plain, n)) return; /* one symbol: known encoder bug (RANS-SINGLE) */
    size_t cap = 2 * n + 1024, sz = 0;
    uint8_t *enc = fz_malloc(cap), *back = fz_malloc(n);
    FUZZ_ASSERT(ts_rans_encode(plain, n, enc, cap, cap, &sz) == TS_OK);
    uint8_t *exact = fz_malloc(sz);
    memcpy(exact, enc, sz);
    FUZZ_ASSERT(ts_rans_decode(exact, sz, back, n) == TS_OK);
    FUZZ_ASSERT(memcmp(back, plain, n) == 0);
    free(exact);
    free(enc);
    free(back);
}

static void roundtrip_tensor(unsigned dtype, unsigned sel, const uint8_t *data, size_t size)
{
    unsigned isz = ts_dtype_size(dtype);
    uint64_t numel = size / isz;
    if (!numel) return;
    uint64_t ce = (sel & 0x80) ? numel : 1 + (uint64_t)(data[0] * 31u + sel) % numel;
    if (numel / ce > 512) ce = numel / 512 + 1; /* bound the number of chunks */
    int mode = (int)(sel % 4);
    int level = (int)((sel >> 2) % 4) - 1; /* -1 .. 2: fast */
    size_t nchunks = (size_t)((numel + ce - 1) / ce);
    uint8_t *enc = fz_malloc((size_t)(numel * isz));
    ts_chunk_out *co = fz_malloc(nchunks * sizeof *co);
    uint64_t out = 0;
    FUZZ_ASSERT(ts_encode_planes(dtype, data, numel, ce, mode, level, 1, enc, &out, co) == TS_OK);
    FUZZ_ASSERT(out <= numel * isz);
    ts_chunk_job *jobs = fz_malloc(nchunks * sizeof *jobs);
    uint64_t off = 0;
    for (size_t k = 0; k < nchunks; k++) {
        uint64_t first = k * ce, n = numel - first < ce ? numel - first : ce, sum = 0;
        for (unsigned p = 0; p < isz; p++) {
            FUZZ_ASSERT(co[k].codecs[p] <= TS_CODEC_RANS && co[k].plane_sizes[p] <= n && co[k].plane_sizes[p] >= 1);
            if (co[k].codecs[p] == TS_CODEC_FILL) FUZZ_ASSERT(co[k].plane_sizes[p] == 1 && n > 1);
            if (co[k].codecs[p] == TS_CODEC_STORED) FUZZ_ASSERT(co[k].plane_sizes[p] == n);
            sum += co[k].plane_sizes[p];
        }
        FUZZ_ASSERT(sum == co[k].size);
        FUZZ_ASSERT(co[k].checksum == ts_xxh3(enc + off, (size_t)co[k].size));
        ts_chunk_job *j = &jobs[k];
        memset(j, 0, sizeof *j);
        j->src = enc + off;
        j->src_size = co[k].size;
        j->dst = fz_malloc((size_t)(n * isz));
        j->n_elems = n;
        j->checksum = co[k].checksum;
        j->dtype = (uint8_t)dtype;
        j->encoding = TS_ENC_PLANES;
        j->verify = 1;
        memcpy(j->codecs, co[k].codecs, sizeof j->codecs);
        memcpy(j->plane_sizes, co[k].plane_sizes, sizeof j->plane_sizes);
        off += co[k].size;
    }
    FUZZ_ASSERT(off == out);
    size_t failed = 0;
    FUZZ_ASSERT(ts_run_jobs(jobs, nchunks, 1, &failed, NULL) == TS_OK);
    for (size_t k = 0; k < nchunks; k++) {
        FUZZ_ASSERT(memcmp(jobs[k].dst, data + k * ce * isz, (size_t)(jobs[k].n_elems * isz)) == 0);
        free(jobs[k].dst);
    }
    free(jobs);
    free(co);
    free(enc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_dctx) g_dctx = ZSTD_createDCtx();
    if (size < 4) return 0;
    unsigned dtype = 1 + data[0] % 12, isz = ts_dtype_size(dtype);
    unsigned sel = data[1];
    size_t n = fz_rd16(data + 2);
    const uint8_t *s = data + 4; /* ends exactly where libFuzzer's buffer ends */
    size_t len = size - 4;

    /* 1. direct decoders */
    uint8_t *huf = fz_malloc(n), *rans = fz_malloc(n);
    ts_status hs = ts_huf_decode(s, len, huf, n);
    FUZZ_ASSERT(hs == TS_OK || hs == TS_E_CORRUPT);
    if (hs == TS_OK) reencode_huf(huf, n);
    ts_status rs = ts_rans_decode(s, len, rans, n);
    FUZZ_ASSERT(rs == TS_OK || rs == TS_E_CORRUPT);
    if (rs == TS_OK) reencode_rans(rans, n);

    /* 2. the same stream as plane 0 of a chunk */
    static const uint8_t codecs[6] = {TS_CODEC_STORED, TS_CODEC_FILL, TS_CODEC_ZSTD, TS_CODEC_HUFFMAN,
                                      TS_CODEC_RANS, 9};
    uint8_t codec = codecs[sel % 6];
    uint8_t *src = fz_malloc(len + isz - 1);
    if (len) memcpy(src, s, len);
    for (unsigned p = 1; p < isz; p++) src[len + p - 1] = (uint8_t)(sel * p);
    ts_chunk_job j;
    memset(&j, 0, sizeof j);
    j.src = src;
    j.src_size = len + isz - 1;
    j.n_elems = n;
    j.dtype = (uint8_t)dtype;
    j.encoding = TS_ENC_PLANES;
    j.verify = (sel >> 3) & 1;
    j.checksum = ts_xxh3(src, (size_t)j.src_size) ^ ((sel >> 4) & 1); /* sometimes wrong */
    j.codecs[0] = codec;
    j.plane_sizes[0] = (uint32_t)len;
    for (unsigned p = 1; p < isz; p++) {
        j.codecs[p] = TS_CODEC_FILL;
        j.plane_sizes[p] = 1;
    }
    uint8_t *dst = fz_malloc(n * isz);
    j.dst = dst;
    size_t failed = 99;
    ts_status js = ts_run_jobs(&j, 1, 1, &failed, NULL);
    if (js != TS_OK) FUZZ_ASSERT(failed == 0);
    /* the chunk's structure is checked first (docs/format.md section 5, plane by plane: a known codec,
     * size <= n, the stored/fill sizes, size >= 1), then the stored checksum, then the planes' streams */
    ts_status structure = TS_OK;
    for (unsigned p = 0; p < isz && structure == TS_OK; p++) {
        uint8_t c = j.codecs[p];
        uint64_t sz = j.plane_sizes[p];
        if (c > TS_CODEC_RANS) structure = TS_E_CODEC;
        else if (sz > n) structure = TS_E_LIMIT;
        else if (c == TS_CODEC_STORED && sz != n) structure = TS_E_LAYOUT;
        else if (c == TS_CODEC_FILL && sz != 1) structure = TS_E_LAYOUT;
        else if (sz == 0) structure = TS_E_LAYOUT;
    }
    if (structure != TS_OK) {
        FUZZ_ASSERT(js == structure);
    } else if (j.verify && (sel >> 4) & 1) {
        FUZZ_ASSERT(js == TS_E_CHECKSUM);
    } else {
        ts_status want;
        switch (codec) {
        case TS_CODEC_STORED: want = TS_OK; break; /* (its size rules are structure, above) */
        case TS_CODEC_FILL: want = TS_OK; break;
        case TS_CODEC_HUFFMAN: want = hs; break;
        case TS_CODEC_RANS: want = rs; break;
        case TS_CODEC_ZSTD: want = js == TS_OK ? TS_OK : TS_E_CORRUPT; break;
        default: want = TS_E_CODEC; break;
        }
        FUZZ_ASSERT(js == want);
        if (js == TS_OK) {
            /* plane 0 of the output equals what the plane decoder produced */
            uint8_t *planes[TS_MAX_PLANES];
            for (unsigned p = 0; p < isz; p++) planes[p] = fz_malloc(n);
            FUZZ_ASSERT(ts_planes_split(dtype, dst, n, planes) == TS_OK);
            const uint8_t *ref = NULL;
            uint8_t *z = NULL;
            if (codec == TS_CODEC_STORED) ref = s;
            if (codec == TS_CODEC_HUFFMAN) ref = huf;
            if (codec == TS_CODEC_RANS) ref = rans;
            if (codec == TS_CODEC_ZSTD) {
                z = fz_malloc(n);
                size_t r = ZSTD_decompress(z, n, s, len);
                FUZZ_ASSERT(!ZSTD_isError(r) && r == n);
                ref = z;
            }
            if (ref) FUZZ_ASSERT(n == 0 || memcmp(planes[0], ref, n) == 0);
            if (codec == TS_CODEC_FILL)
                for (size_t i = 0; i < n; i++) FUZZ_ASSERT(planes[0][i] == s[0]);
            for (unsigned p = 1; p < isz; p++)
                for (size_t i = 0; i < n; i++) FUZZ_ASSERT(planes[p][i] == (uint8_t)(sel * p));
            for (unsigned p = 0; p < isz; p++) free(planes[p]);
            free(z);
        }
    }
    free(dst);
    free(src);
    free(huf);
    free(rans);

    /* 3. round-trip oracle over the whole input */
    roundtrip_tensor(dtype, sel, data, size);
    return 0;
}
