"""Undo the byte-plane regrouping of docs/format.md section 5 on a device.

`merge_planes(planes, dtype, out)` takes the planes of n elements laid out plane-major (plane p of
element i at planes[p*n + i], the layout `decode_planes_into` writes, docs/native-api.md) and writes
the n elements into `out` (a uint8 tensor of n x itemsize bytes, typically a slice of the destination
tensor's bytes).  Two implementations with identical results:

* `merge_planes_triton`: Triton kernels, one per plane order (bfloat16, float32, generic).  All their
  arithmetic is integer (int32 / int64) and the result is stored through an integer view of the
  destination, so no float arithmetic ever touches the bits (the Triton CPU interpreter mishandles
  bfloat16 arithmetic; integers are exact everywhere).
* `merge_planes_torch`: the torch reference, integer ops on any device.

`f16_planes=True` (files with the "float16 exponent planes" feature, docs/format.md section 2.1): float16
planes are in the exponent-planes order, whose formula is bfloat16's, so they go through the bfloat16
kernel; without it float16 uses the generic order (1.0 files).

`merge_planes(..., backend="auto")` uses Triton where it can run (a CUDA tensor with Triton installed,
or any tensor when TRITON_INTERPRET=1 was set before this module was imported) and torch otherwise.
"""

from __future__ import annotations

import os

import torch

from tinyserve import errors
from tinyserve.spec import DTYPES

try:  # Triton is optional: without it the torch reference does the work
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure (no package, no driver) means "no Triton"
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
BACKENDS = ("auto", "triton", "torch")
# elements per Triton program: the interpreter runs each program in Python, so it gets fewer, larger ones
BLOCK = 16384 if INTERPRET else 2048
MAX_PLANE_BYTES = 1 << 30  # elements per call (offsets are int64 in the kernels; this bounds one launch)


def itemsize(dtype: str) -> int:
    try:
        return DTYPES[dtype][1]
    except KeyError:
        raise errors.UnsupportedError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}") from None


def plane_order(dtype: str, f16_planes: bool = False) -> str:
    """Which regrouping formula a dtype's planes use: 'bfloat16', 'float32' or 'generic'."""
    if dtype == "bfloat16" or (f16_planes and dtype == "float16"):
        return "bfloat16"
    return "float32" if dtype == "float32" else "generic"


def _check(planes: torch.Tensor, dtype: str, out: torch.Tensor) -> tuple[int, int]:
    isz = itemsize(dtype)
    for what, t in (("planes", planes), ("out", out)):
        if t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
            raise errors.DestinationError(f"merge_planes: {what} must be a contiguous 1-d uint8 tensor, got "
                                          f"{t.dtype} {list(t.shape)}{'' if t.is_contiguous() else ' (strided)'}")
    if planes.device != out.device:
        raise errors.DestinationError(f"merge_planes: planes on {planes.device}, out on {out.device}")
    if out.numel() != planes.numel() or out.numel() % isz:
        raise errors.DestinationError(f"merge_planes: {planes.numel()} plane bytes and {out.numel()} output "
                                      f"bytes; both must be the same multiple of the {dtype} itemsize {isz}")
    n = out.numel() // isz
    if n > MAX_PLANE_BYTES:
        raise errors.LimitError(f"merge_planes: {n} elements in one call, more than the limit {MAX_PLANE_BYTES}")
    return isz, n


# ------------------------------------------------------------------------------------------------
# torch reference


def merge_planes_torch(planes: torch.Tensor, dtype: str, out: torch.Tensor, f16_planes: bool = False) -> torch.Tensor:
    """Reference: the inverse of the section-5 regrouping with torch integer ops (any device)."""
    isz, n = _check(planes, dtype, out)
    if n == 0:
        return out
    pl = planes.view(isz, n)
    order = plane_order(dtype, f16_planes)
    if order == "bfloat16":
        e = pl[0].to(torch.int32)
        m = pl[1].to(torch.int32)
        x = (e << 7) | (m & 0x7F) | ((m & 0x80) << 8)     # the 16 bits, 0..65535
        x -= (x >> 15) << 16                               # the same bits as a signed 16-bit value
        out.view(torch.int16).copy_(x.to(torch.int16))     # in range: an exact conversion
        return out
    if order == "float32":
        p0, p1 = pl[0].to(torch.int64), pl[1].to(torch.int64)
        x = ((p1 & 0x80) << 24) | (p0 << 23) | ((p1 & 0x7F) << 16) | (pl[2].to(torch.int64) << 8) | pl[3]
        x -= (x >> 31) << 32                               # as a signed 32-bit value
        out.view(torch.int32).copy_(x.to(torch.int32))
        return out
    # generic: plane p = little-endian byte itemsize-1-p
    out.view(n, isz).copy_(pl.flip(0).t())
    return out


# ------------------------------------------------------------------------------------------------
# Triton kernels (integer arithmetic only)

if triton is not None:

    @triton.jit
    def _merge_bf16(planes_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # out_ptr: int16 view of the destination
        pid = tl.program_id(0)
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        e = tl.load(planes_ptr + i, mask=mask, other=0).to(tl.int32)
        m = tl.load(planes_ptr + n + i, mask=mask, other=0).to(tl.int32)
        x = (e << 7) | (m & 0x7F) | ((m & 0x80) << 8)           # 0..65535
        x = tl.where(x >= 32768, x - 65536, x)                    # the same 16 bits as a signed value
        tl.store(out_ptr + i, x.to(tl.int16), mask=mask)

    @triton.jit
    def _merge_f32(planes_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # out_ptr: int32 view of the destination
        pid = tl.program_id(0)
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        p0 = tl.load(planes_ptr + i, mask=mask, other=0).to(tl.int64)
        p1 = tl.load(planes_ptr + n + i, mask=mask, other=0).to(tl.int64)
        p2 = tl.load(planes_ptr + 2 * n + i, mask=mask, other=0).to(tl.int64)
        p3 = tl.load(planes_ptr + 3 * n + i, mask=mask, other=0).to(tl.int64)
        x = ((p1 & 0x80) << 24) | (p0 << 23) | ((p1 & 0x7F) << 16) | (p2 << 8) | p3   # 0..2^32-1
        x = tl.where(x >= 2147483648, x - 4294967296, x)
        tl.store(out_ptr + i, x.to(tl.int32), mask=mask)

    @triton.jit
    def _merge_generic(planes_ptr, out_ptr, n, ISZ: tl.constexpr, BLOCK: tl.constexpr):
        # out_ptr: uint8 destination; output byte j = element j // ISZ, byte b = j % ISZ <- plane ISZ-1-b
        pid = tl.program_id(0)
        j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = j < n * ISZ
        i = j // ISZ
        b = j - i * ISZ
        v = tl.load(planes_ptr + (ISZ - 1 - b) * n + i, mask=mask, other=0)
        tl.store(out_ptr + j, v, mask=mask)


def triton_usable(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device` here."""
    if triton is None:
        return False
    dev = torch.device(device)
    if INTERPRET:
        return True
    return dev.type == "cuda"


def merge_planes_triton(planes: torch.Tensor, dtype: str, out: torch.Tensor, f16_planes: bool = False) -> torch.Tensor:
    """The Triton kernels (on a CUDA device, or on the CPU under TRITON_INTERPRET=1).  Launched on the
    current CUDA stream of the tensors' device."""
    isz, n = _check(planes, dtype, out)
    if not triton_usable(out.device):
        raise errors.UnsupportedError(f"merge_planes: Triton cannot run on {out.device} here "
                                      f"({'not installed' if triton is None else 'set TRITON_INTERPRET=1 for CPU'})")
    if n == 0:
        return out
    order = plane_order(dtype, f16_planes)
    if order == "bfloat16":
        _merge_bf16[(triton.cdiv(n, BLOCK),)](planes, out.view(torch.int16), n, BLOCK=BLOCK)
    elif order == "float32":
        _merge_f32[(triton.cdiv(n, BLOCK),)](planes, out.view(torch.int32), n, BLOCK=BLOCK)
    elif isz == 1:
        out.copy_(planes)
    else:
        _merge_generic[(triton.cdiv(n * isz, BLOCK),)](planes, out, n, ISZ=isz, BLOCK=BLOCK)
    return out


def merge_planes(planes: torch.Tensor, dtype: str, out: torch.Tensor, backend: str = "auto",
                 f16_planes: bool = False) -> torch.Tensor:
    """Write the n elements whose plane-major planes are `planes` into `out` (uint8, n x itemsize)."""
    if backend not in BACKENDS:
        raise errors.ConfigError(f"merge backend {backend!r} is not one of {BACKENDS}")
    if backend == "triton" or (backend == "auto" and triton_usable(out.device)):
        return merge_planes_triton(planes, dtype, out, f16_planes)
    return merge_planes_torch(planes, dtype, out, f16_planes)


def split_planes_torch(data: torch.Tensor, dtype: str, f16_planes: bool = False) -> torch.Tensor:
    """The forward regrouping (test helper and bench input): raw little-endian bytes of n elements ->
    plane-major planes (isz x n bytes, flattened)."""
    isz = itemsize(dtype)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() % isz:
        raise errors.DestinationError(f"split_planes: want 1-d uint8 bytes, a multiple of {isz}")
    n = data.numel() // isz
    b = data.view(n, isz).to(torch.int32)
    if plane_order(dtype, f16_planes) == "bfloat16":
        x = b[:, 0] | (b[:, 1] << 8)
        return torch.stack([(x >> 7) & 0xFF, ((x >> 8) & 0x80) | (x & 0x7F)]).to(torch.uint8).reshape(-1)
    if dtype == "float32":
        p0 = ((b[:, 3] & 0x7F) << 1) | (b[:, 2] >> 7)
        p1 = (b[:, 3] & 0x80) | (b[:, 2] & 0x7F)
        return torch.stack([p0, p1, b[:, 1], b[:, 0]]).to(torch.uint8).reshape(-1)
    return data.view(n, isz).flip(1).t().contiguous().reshape(-1)
