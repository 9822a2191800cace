#include "ts_planes.h"
#include <string.h>

unsigned ts_dtype_size(unsigned dtype)
{
    switch (dtype) {
    case TS_DT_FLOAT32: case TS_DT_INT32: return 4;
    case TS_DT_FLOAT16: case TS_DT_BFLOAT16: case TS_DT_INT16: return 2;
    case TS_DT_FLOAT64: case TS_DT_INT64: return 8;
    case TS_DT_INT8: case TS_DT_UINT8: case TS_DT_BOOL: case TS_DT_F8E4M3: case TS_DT_F8E5M2: return 1;
    default: return 0;
    }
}

ts_status ts_planes_split(unsigned dtype, const uint8_t *src, size_t n, uint8_t *const planes[])
{
    return ts_planes_split_ex(dtype, 0, src, n, planes);
}

ts_status ts_planes_merge(unsigned dtype, const uint8_t *const planes[], size_t n, uint8_t *dst)
{
    return ts_planes_merge_ex(dtype, 0, planes, n, dst);
}

/* bfloat16, and float16 in the exponent-planes order, share one formula: plane 0 = bits 14..7,
 * plane 1 = bit 15 (as bit 7) and bits 6..0 */
static int split16(unsigned dtype, unsigned flags)
{
    return dtype == TS_DT_BFLOAT16 || (dtype == TS_DT_FLOAT16 && (flags & TS_PLANES_F16_EXP));
}

ts_status ts_planes_split_ex(unsigned dtype, unsigned flags, const uint8_t *src, size_t n, uint8_t *const planes[])
{
    unsigned size = ts_dtype_size(dtype);
    if (!size) return TS_E_DTYPE;
    if (split16(dtype, flags)) {
        uint8_t *e = planes[0], *m = planes[1];
        for (size_t i = 0; i < n; i++) {
            uint16_t x = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
            e[i] = (uint8_t)(x >> 7);
            m[i] = (uint8_t)(((x >> 8) & 0x80) | (x & 0x7F));
        }
    } else if (dtype == TS_DT_FLOAT32) {
        uint8_t *p0 = planes[0], *p1 = planes[1], *p2 = planes[2], *p3 = planes[3];
        for (size_t i = 0; i < n; i++) {
            uint32_t x;
            memcpy(&x, src + 4 * i, 4);
            p0[i] = (uint8_t)(x >> 23);
            p1[i] = (uint8_t)(((x >> 24) & 0x80) | ((x >> 16) & 0x7F));
            p2[i] = (uint8_t)(x >> 8);
            p3[i] = (uint8_t)x;
        }
    } else {
        for (unsigned p = 0; p < size; p++) {
            uint8_t *d = planes[p];
            const uint8_t *s = src + (size - 1 - p);
            for (size_t i = 0; i < n; i++) d[i] = s[(size_t)size * i];
        }
    }
    return TS_OK;
}

ts_status ts_planes_merge_ex(unsigned dtype, unsigned flags, const uint8_t *const planes[], size_t n, uint8_t *dst)
{
    unsigned size = ts_dtype_size(dtype);
    if (!size) return TS_E_DTYPE;
    if (split16(dtype, flags)) {
        const uint8_t *e = planes[0], *m = planes[1];
        for (size_t i = 0; i < n; i++) {
            uint16_t x = (uint16_t)(((uint16_t)e[i] << 7) | (m[i] & 0x7F) | ((uint16_t)(m[i] & 0x80) << 8));
            memcpy(dst + 2 * i, &x, 2);
        }
    } else if (dtype == TS_DT_FLOAT32) {
        const uint8_t *p0 = planes[0], *p1 = planes[1], *p2 = planes[2], *p3 = planes[3];
        for (size_t i = 0; i < n; i++) {
            uint32_t x = ((uint32_t)(p1[i] & 0x80) << 24) | ((uint32_t)p0[i] << 23) |
                         ((uint32_t)(p1[i] & 0x7F) << 16) | ((uint32_t)p2[i] << 8) | p3[i];
            memcpy(dst + 4 * i, &x, 4);
        }
    } else if (size == 1) {
        memcpy(dst, planes[0], n);
    } else {
        for (unsigned p = 0; p < size; p++) {
            const uint8_t *s = planes[p];
            uint8_t *d = dst + (size - 1 - p);
            for (size_t i = 0; i < n; i++) d[(size_t)size * i] = s[i];
        }
    }
    return TS_OK;
}
