/* Order-0 rANS over bytes: 12-bit probabilities, 8 interleaved 32-bit states sharing one stream of
 * 16-bit words (docs/format.md section 7). Reaches the order-0 entropy within ~0.1% where Huffman's
 * whole-bit code lengths cannot (near-uniform planes such as bf16 sign+mantissa bytes). */
#ifndef TS_RANS_H
#define TS_RANS_H
#include <stddef.h>
#include <stdint.h>
#include "ts_rules.h"
#include "ts_status.h"

#define TS_RANS_PROB_BITS 12
#define TS_RANS_STATES 8

/* Deterministic normalisation of counts (n = their sum > 0) to frequencies summing to 4096, every
 * present symbol >= 1 (docs/native-api.md). */
void ts_rans_normalize(const uint64_t counts[256], uint64_t n, uint32_t freq[256]);

/* Encode n >= 1 bytes. Returns TS_E_LIMIT (writing nothing useful) when the stream would exceed
 * `limit` bytes. dst_cap must be >= limit. *out_size receives the size. */
ts_status ts_rans_encode(const uint8_t *src, size_t n, uint8_t *dst, size_t dst_cap, size_t limit,
                         size_t *out_size);

/* Decode a stream of `size` bytes into exactly n bytes; never reads or writes out of bounds. */
ts_status ts_rans_decode(const uint8_t *src, size_t size, uint8_t *dst, size_t n);
/* The same, naming the broken rule in *err (err may be NULL). */
ts_status ts_rans_decode_ex(const uint8_t *src, size_t size, uint8_t *dst, size_t n, ts_codec_error *err);

#endif
