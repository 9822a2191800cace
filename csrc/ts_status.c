#include "ts_status.h"

const char *ts_strstatus(ts_status s)
{
    switch (s) {
    case TS_OK: return "ok";
    case TS_E_TRUNCATED: return "truncated";
    case TS_E_MAGIC: return "bad magic";
    case TS_E_VERSION: return "unsupported version";
    case TS_E_LIMIT: return "limit exceeded";
    case TS_E_OVERFLOW: return "size overflow";
    case TS_E_LAYOUT: return "bad layout";
    case TS_E_DTYPE: return "unknown dtype";
    case TS_E_ENCODING: return "unknown encoding";
    case TS_E_CODEC: return "unknown codec";
    case TS_E_CHECKSUM: return "checksum mismatch";
    case TS_E_CORRUPT: return "corrupt stream";
    case TS_E_DST_SIZE: return "wrong destination size";
    case TS_E_NOMEM: return "out of memory";
    case TS_E_ARG: return "invalid argument";
    case TS_E_NAME: return "bad tensor name";
    case TS_E_FIELD: return "non-zero reserved field or unknown feature";
    case TS_E_DECODED_CHECKSUM: return "decoded checksum mismatch";
    }
    return "unknown status";
}
