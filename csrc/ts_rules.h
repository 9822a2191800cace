/* The codec rules of docs/format.md sections 5-7 a chunk can break, reported with the values the
 * rule's message names (tinyserve/_native/codec_rules.py holds the one message table both backends
 * format from). Caller-owned, optional: every decoder takes a ts_codec_error * that may be NULL. */
#ifndef TS_RULES_H
#define TS_RULES_H
#include <stdint.h>
#include "ts_status.h"

#define TS_NO_PLANE 0xFFFFFFFFu

enum ts_rule {
    TS_RULE_NONE = 0,
    /* chunk structure (section 3 / 5) */
    TS_RULE_RAW_SIZE = 1,        /* a = chunk size, b = n, c = itemsize */
    TS_RULE_PLANE_CODEC = 2,     /* a = codec */
    TS_RULE_PLANE_SIZE_MAX = 3,  /* a = size, b = n */
    TS_RULE_STORED_SIZE = 4,     /* a = size, b = n */
    TS_RULE_FILL_SIZE = 5,       /* a = size */
    TS_RULE_PLANE_SIZE_ZERO = 6,
    TS_RULE_PLANES_SUM = 7,      /* a = sum of plane sizes, b = chunk size */
    TS_RULE_CHECKSUM = 8,        /* a = recorded, b = computed */
    /* zstd (section 5, codec 2) */
    TS_RULE_ZSTD_SHORT = 10,     /* a = size */
    TS_RULE_ZSTD_MAGIC = 11,     /* a = the first 4 bytes, little-endian */
    TS_RULE_ZSTD_HEADER = 12,    /* a = header bytes needed, b = size */
    TS_RULE_ZSTD_RESERVED = 13,  /* a = frame header descriptor */
    TS_RULE_ZSTD_DICT = 14,      /* a = dictionary id */
    TS_RULE_ZSTD_NO_SIZE = 15,   /* b = n */
    TS_RULE_ZSTD_SIZE = 16,      /* a = declared content size, b = n */
    TS_RULE_ZSTD_BLOCK_TYPE = 17,/* a = block index */
    TS_RULE_ZSTD_BLOCK_SIZE = 18,/* a = block index, b = Block_Size, c = Block_Maximum_Size */
    TS_RULE_ZSTD_TRUNCATED = 19, /* a = block index (or blocks when the checksum is cut), b = size */
    TS_RULE_ZSTD_TRAILING = 20,  /* a = frame end, b = bytes after it */
    TS_RULE_ZSTD_DECODE = 21,    /* libzstd refuses the frame */
    TS_RULE_ZSTD_LENGTH = 22,    /* a = decoded bytes, b = n */
    /* huffman (section 6, codec 3) */
    TS_RULE_HUF_SHORT = 30,      /* a = size */
    TS_RULE_HUF_LEN = 31,        /* a = length, b = symbol */
    TS_RULE_HUF_FEW = 32,        /* a = present symbols */
    TS_RULE_HUF_KRAFT = 33,      /* a = Kraft sum */
    TS_RULE_HUF_SIZES = 34,      /* a = size0 + size1 + size2, b = bytes after the header */
    TS_RULE_HUF_EARLY = 35,      /* a = sub-stream, b = its symbols, c = its bytes */
    TS_RULE_HUF_LEFTOVER = 36,   /* a = sub-stream, b = bytes left over, c = bytes used */
    /* rans (section 7, codec 4) */
    TS_RULE_RANS_TABLE = 40,     /* a = symbol, b = size */
    TS_RULE_RANS_VARINT = 41,    /* a = symbol */
    TS_RULE_RANS_FREQ = 42,      /* a = symbol, b = frequency */
    TS_RULE_RANS_SUM = 43,       /* a = sum */
    TS_RULE_RANS_STATES = 44,    /* a = bytes present */
    TS_RULE_RANS_STATE_LOW = 45, /* a = state, b = value */
    TS_RULE_RANS_ODD = 46,       /* a = word bytes */
    TS_RULE_RANS_WORDS_OUT = 47, /* a = n */
    TS_RULE_RANS_WORDS_LEFT = 48,/* a = unread words, b = n */
    TS_RULE_RANS_FINAL = 49,     /* a = state, b = value */
    /* decoded bytes */
    TS_RULE_DECODED_CHECKSUM = 60 /* a = recorded, b = computed */
};

typedef struct ts_codec_error {
    uint32_t rule;   /* enum ts_rule */
    uint32_t plane;  /* the plane, TS_NO_PLANE for a chunk-level rule */
    uint64_t a, b, c;
} ts_codec_error;

/* Record a broken rule (err may be NULL) and return st. */
static inline ts_status ts_rule_fail(ts_codec_error *err, ts_status st, uint32_t rule, uint64_t a, uint64_t b,
                                     uint64_t c)
{
    if (err) {
        err->rule = rule;
        err->a = a;
        err->b = b;
        err->c = c;
    }
    return st;
}

#endif
