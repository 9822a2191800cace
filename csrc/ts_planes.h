/* Byte-plane regrouping of tensor elements (docs/format.md section 5). */
#ifndef TS_PLANES_H
#define TS_PLANES_H
#include <stddef.h>
#include <stdint.h>
#include "ts_status.h"

enum {
    TS_DT_FLOAT32 = 1, TS_DT_FLOAT16 = 2, TS_DT_BFLOAT16 = 3, TS_DT_FLOAT64 = 4,
    TS_DT_INT8 = 5, TS_DT_UINT8 = 6, TS_DT_INT16 = 7, TS_DT_INT32 = 8, TS_DT_INT64 = 9,
    TS_DT_BOOL = 10, TS_DT_F8E4M3 = 11, TS_DT_F8E5M2 = 12
};
#define TS_MAX_PLANES 8

/* Bytes per element of a dtype code, 0 when the code is unknown. */
unsigned ts_dtype_size(unsigned dtype);

/* Plane-order flags (docs/format.md section 5). TS_PLANES_F16_EXP: float16 uses the "float16
 * exponent planes" order of files with that feature bit (plane 0 = exponent and the top 3 mantissa
 * bits); without it float16 keeps the generic order of 1.0 files. Other dtypes ignore it. */
#define TS_PLANES_F16_EXP 1u

/* Split n elements at src into itemsize planes of n bytes each. */
ts_status ts_planes_split(unsigned dtype, const uint8_t *src, size_t n, uint8_t *const planes[]);
ts_status ts_planes_split_ex(unsigned dtype, unsigned flags, const uint8_t *src, size_t n, uint8_t *const planes[]);

/* Inverse of ts_planes_split: planes (n bytes each) -> n elements at dst. */
ts_status ts_planes_merge(unsigned dtype, const uint8_t *const planes[], size_t n, uint8_t *dst);
ts_status ts_planes_merge_ex(unsigned dtype, unsigned flags, const uint8_t *const planes[], size_t n, uint8_t *dst);

#endif
