/* Closed status set returned by every tinyserve C function. C99, no Python. */
#ifndef TS_STATUS_H
#define TS_STATUS_H

typedef enum ts_status {
    TS_OK = 0,
    TS_E_TRUNCATED = 1,   /* input ends before the bytes it declares */
    TS_E_MAGIC = 2,       /* not a tinyserve weights file */
    TS_E_VERSION = 3,     /* unsupported major version */
    TS_E_LIMIT = 4,       /* a declared count/size breaks a documented limit */
    TS_E_OVERFLOW = 5,    /* arithmetic on declared sizes would overflow */
    TS_E_LAYOUT = 6,      /* holes, overlaps, misalignment, wrong file size, bad sizes */
    TS_E_DTYPE = 7,       /* unknown dtype code */
    TS_E_ENCODING = 8,    /* unknown encoding code */
    TS_E_CODEC = 9,       /* unknown codec code */
    TS_E_CHECKSUM = 10,   /* stored bytes do not match their checksum */
    TS_E_CORRUPT = 11,    /* a compressed stream is malformed */
    TS_E_DST_SIZE = 12,   /* destination has the wrong size */
    TS_E_NOMEM = 13,      /* allocation failed */
    TS_E_ARG = 14,        /* invalid argument from the caller */
    TS_E_NAME = 15,       /* tensor name empty, too long, not UTF-8, has NUL, duplicate */
    TS_E_FIELD = 16,      /* a reserved/flags field is non-zero, or a feature bit is unknown */
    TS_E_DECODED_CHECKSUM = 17 /* decoded bytes do not match the chunk's decoded checksum */
} ts_status;

const char *ts_strstatus(ts_status s);

#endif
