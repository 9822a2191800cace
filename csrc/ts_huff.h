/* Order-0 canonical Huffman codec over bytes, 4 interleaved sub-streams (docs/format.md section 6). */
#ifndef TS_HUFF_H
#define TS_HUFF_H
#include <stddef.h>
#include <stdint.h>
#include "ts_rules.h"
#include "ts_status.h"

#define TS_HUF_MAX_BITS 11
#define TS_HUF_HEADER 140
#define TS_HUF_SLACK 8 /* the encoder needs this many writable bytes past the encoded size */

/* Histogram of n bytes. */
void ts_huf_count(const uint8_t *src, size_t n, uint64_t counts[256]);

/* Deterministic length-limited code lengths (docs/native-api.md). Returns the number of distinct
 * symbols; lengths are only meaningful when it is >= 2. */
int ts_huf_lengths(const uint64_t counts[256], uint8_t lens[256]);

/* Exact encoded size of src under lens (TS_HUF_HEADER included). */
uint64_t ts_huf_size(const uint8_t *src, size_t n, const uint8_t lens[256]);

/* Encode src (n bytes). If the stream would be larger than `limit` returns TS_E_LIMIT and writes
 * nothing. dst_cap must be >= encoded size + TS_HUF_SLACK. *out_size receives the stream size.
 * Returns TS_E_ARG when fewer than 2 distinct symbols occur. */
ts_status ts_huf_encode(const uint8_t *src, size_t n, uint8_t *dst, size_t dst_cap, size_t limit,
                        size_t *out_size);

/* Decode a stream of `size` bytes into exactly n bytes at dst. Never reads outside src[0..size)
 * nor writes outside dst[0..n). */
ts_status ts_huf_decode(const uint8_t *src, size_t size, uint8_t *dst, size_t n);
/* The same, naming the broken rule in *err (err may be NULL). */
ts_status ts_huf_decode_ex(const uint8_t *src, size_t size, uint8_t *dst, size_t n, ts_codec_error *err);

#endif
