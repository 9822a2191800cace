"""Frames of the wire protocol (docs/protocol.md): encode and decode, every length checked first.

A frame is `u32 body_len | u32 header_len | msgpack header | pad to 8 | payload | pad to 8`, all
little-endian; frames are multiples of 8 bytes so every payload is 8-aligned in the stream.  Tensor
bytes never go through msgpack: they are written from the arrays' own memory (writelines) and read
as views of the receive buffer.

Pure functions, no I/O: the server's protocol and both clients use them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from tinyserve import errors
from tinyserve.spec import DTYPES

PROTOCOL_VERSION = 1
MAX_REQUEST_ID = (1 << 64) - 1  # ids are 1..2^64-1; 0 is reserved for connection-level errors
PREFIX = struct.Struct("<II")  # body_len, header_len
PREFIX_SIZE = PREFIX.size
ALIGN = 8
TENSOR_ALIGN = 64  # to_array(torch=True) hands the model inputs aligned to this (see there)
BYTES_DTYPE = "bytes"
WIRE_DTYPES = tuple(DTYPES) + (BYTES_DTYPE,)  # float8: the raw 1-byte codes, as in docs/format.md
_WIRE_DTYPE_SET = frozenset(WIRE_DTYPES)
# numeric wire dtypes numpy has no type for: they arrive as torch tensors (the wire's names are torch's)
TORCH_ONLY_DTYPES = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})
MAX_DIM = 1 << 48  # a dimension, and a tensor's extent (the product of its dimensions, 0 counted as 1)
NUMPY_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8,
    "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
}
DTYPE_OF_NUMPY = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
_ZEROS = bytes(ALIGN)
_TORCH_NAMES: dict = {}  # torch.dtype -> wire name (None: not sendable), filled as dtypes are met


# --- wire error codes (docs/protocol.md section 5) ------------------------------------------------
WireError = errors.WireError  # (defined with InvalidInput in tinyserve.errors, below the layers that raise it)


def _wire_error(name: str, code: str, fatal: bool = False, base=WireError):
    return type(name, (base,), {"code": code, "fatal": fatal, "__doc__": f"wire code {code}"})


BadFrame = _wire_error("BadFrame", "BAD_FRAME", fatal=True)
FrameTooLarge = _wire_error("FrameTooLarge", "FRAME_TOO_LARGE", fatal=True)
Unauthenticated = _wire_error("Unauthenticated", "UNAUTHENTICATED", fatal=True)
BadRequest = _wire_error("BadRequest", "BAD_REQUEST")
DuplicateId = _wire_error("DuplicateId", "DUPLICATE_ID")
InvalidInput = errors.InvalidInput
Unavailable = _wire_error("Unavailable", "UNAVAILABLE")
TooManyRequests = _wire_error("TooManyRequests", "TOO_MANY_REQUESTS")
DeadlineExceeded = _wire_error("DeadlineExceeded", "DEADLINE_EXCEEDED")
ShuttingDown = _wire_error("ShuttingDown", "SHUTTING_DOWN")
QueueFull = _wire_error("QueueFull", "QUEUE_FULL")
ResourceExhausted = _wire_error("ResourceExhausted", "RESOURCE_EXHAUSTED")

# every code a reply may carry -> the exception class a client raises for it
WIRE_ERRORS: dict[str, type[errors.TinyserveError]] = {
    cls.code: cls for cls in (BadFrame, FrameTooLarge, Unauthenticated, BadRequest, DuplicateId,
                               InvalidInput, Unavailable, TooManyRequests, DeadlineExceeded, ShuttingDown,
                               QueueFull, ResourceExhausted)
}
WIRE_ERRORS["NOT_FOUND"] = errors.ModelNotFoundError
WIRE_ERRORS["MODEL_ERROR"] = errors.ModelError
WIRE_ERRORS["INTERNAL"] = errors.TinyserveError


def wire_code(exc: BaseException) -> str:
    """The wire code for an exception raised while serving a request."""
    if isinstance(exc, WireError):
        return exc.code
    if isinstance(exc, errors.ModelNotFoundError):
        return "NOT_FOUND"
    if isinstance(exc, errors.InvalidNameError):
        return "BAD_REQUEST"
    if isinstance(exc, (errors.ModelError, errors.ConfigError)):  # a model's config is the model's fault
        return "MODEL_ERROR"
    if isinstance(exc, errors.RepositoryError):  # storage unreachable, refused, or holding bad objects
        return "UNAVAILABLE"
    return "INTERNAL"


def error_from_reply(code: str, message: str) -> errors.TinyserveError:
    return WIRE_ERRORS.get(code, errors.TinyserveError)(message)


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 256 << 20
    max_header_bytes: int = 1 << 20
    max_tensors: int = 256
    max_ndim: int = 8

    def to_dict(self) -> dict:
        return {"max_frame_bytes": self.max_frame_bytes, "max_header_bytes": self.max_header_bytes,
                "max_tensors": self.max_tensors}


def align8(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


# --- encoding ------------------------------------------------------------------------------------
def _array_bytes(value) -> tuple[str, tuple, memoryview]:
    """(wire dtype, shape, byte view) of a numpy array, a torch tensor or a sequence of bytes/str."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bytes, bytearray, memoryview, str)) for v in value):
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
        out = bytearray()
        for it in items:
            out += struct.pack("<I", len(it))
            out += it
        return BYTES_DTYPE, (len(items),), memoryview(out)
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        tdt = t.dtype
        name = _TORCH_NAMES.get(tdt, "")
        if name == "":
            name = str(tdt).removeprefix("torch.")  # torch's dtype names are the wire's
            name = _TORCH_NAMES[tdt] = name if name in _WIRE_DTYPE_SET else None
        if name is None:
            raise InvalidInput(f"dtype {tdt} cannot be sent (wire dtypes: {', '.join(WIRE_DTYPES)})")
        if not t.numel():
            return name, tuple(t.shape), memoryview(b"")
        if name in TORCH_ONLY_DTYPES:  # numpy has no bfloat16 / float8: view the bytes in torch first
            return name, tuple(t.shape), memoryview(t.reshape(-1).view(torch.uint8).numpy())
        return name, tuple(t.shape), memoryview(t.numpy()).cast("B")
    arr = np.asarray(value)
    if arr.dtype.kind in ("U", "S", "O"):
        return _array_bytes(list(arr.reshape(-1).tolist()))
    name = DTYPE_OF_NUMPY.get(arr.dtype.newbyteorder("=") if arr.dtype.byteorder == ">" else arr.dtype)
    if name is None:
        raise InvalidInput(f"numpy dtype {arr.dtype} cannot be sent (wire dtypes: {', '.join(WIRE_DTYPES)})")
    shape = arr.shape  # before ascontiguousarray, which makes a 0-d array 1-d
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    return name, shape, memoryview(arr.reshape(-1).view(np.uint8))


def tensor_parts(tensors: Mapping[str, object]) -> tuple[list[dict], list[memoryview]]:
    """Descriptors and byte views for named tensors (numpy arrays, torch tensors, lists of bytes/str)."""
    descs, views = [], []
    for name, value in tensors.items():
        dtype, shape, view = _array_bytes(value)
        descs.append({"name": name, "dtype": dtype, "shape": list(shape), "nbytes": view.nbytes})
        views.append(view)
    return descs, views


def encode_frame(header: Mapping, views: Sequence[memoryview] = ()) -> list:
    """The buffers of one frame, ready for transport.writelines (tensor bytes are not copied).

    The first buffer holds the prefix, the header and its padding; then each view and its padding."""
    return _frame_of(msgpack.packb(header, use_bin_type=True), views)


class ReplyEncoder:
    """The `infer` reply frames of one model version, built faster than the generic path and
    byte for byte the same as ``encode_frame({"id": rid, "ok": True, "model": model, "version":
    version, "outputs": descs}, views)`` with ``descs, views = tensor_parts(outputs)``.

    The header's constant part (every key, the model's name and version) is packed once; per reply
    only the id and the output descriptors are packed.  A contiguous CPU torch tensor of a numpy
    dtype is sent from ``memoryview(t.numpy())`` without tensor_parts' per-value dispatch; anything
    else (numpy arrays, bytes lists, bfloat16 / float8, empty or strided tensors) goes through
    `_array_bytes` as before."""

    __slots__ = ("_id_key", "_tail")

    def __init__(self, model: str, version: int) -> None:
        if not _FAST_TORCH:
            _fast_torch_dtypes()
        pack = msgpack.packb
        self._id_key = b"\x85" + pack("id")  # a map of 5 entries, in encode_frame's order
        self._tail = b"".join(pack(x, use_bin_type=True) for x in ("ok", True, "model", model, "version",
                                                                    version, "outputs"))

    def encode(self, rid: int, outputs: Mapping[str, object]) -> list:
        descs, views = [], []
        tensor, fast = _TENSOR_TYPE[0], _FAST_TORCH
        for name, value in outputs.items():
            view = None
            if type(value) is tensor and value.is_cpu and not value.requires_grad and value.is_contiguous():
                wname = fast.get(value.dtype)
                if wname is not None and value.numel():
                    view = memoryview(value.numpy()).cast("B")
                    descs.append({"name": name, "dtype": wname, "shape": list(value.shape), "nbytes": view.nbytes})
            if view is None:
                dtype, shape, view = _array_bytes(value)
                descs.append({"name": name, "dtype": dtype, "shape": list(shape), "nbytes": view.nbytes})
            views.append(view)
        head = b"".join((self._id_key, msgpack.packb(rid), self._tail, msgpack.packb(descs, use_bin_type=True)))
        return _frame_of(head, views)


def _frame_of(head: bytes, views: Sequence[memoryview]) -> list:
    """encode_frame's buffers for an already packed header."""
    hlen = len(head)
    payload_off = align8(PREFIX_SIZE + hlen)
    parts: list = [None]
    size = payload_off
    for v in views:
        n = v.nbytes
        if n:
            parts.append(v)
        pad = align8(n) - n
        if pad:
            parts.append(_ZEROS[:pad])
        size += n + pad
    parts[0] = PREFIX.pack(size - 4, hlen) + head + _ZEROS[: payload_off - PREFIX_SIZE - hlen]
    return parts


_TENSOR_TYPE: list = [None]  # torch.Tensor, once a ReplyEncoder is made (the client does not import torch)
_FAST_TORCH: dict = {}  # torch dtypes numpy views directly -> their wire names


def _fast_torch_dtypes() -> None:
    import torch

    _FAST_TORCH.update({getattr(torch, n): n for n in NUMPY_DTYPES})
    _TENSOR_TYPE[0] = torch.Tensor


def error_header(rid: int, code: str, message: str) -> dict:
    """The header of an error reply (docs/protocol.md section 2)."""
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


def encode_error(rid: int, code: str, message: str) -> list:
    return encode_frame(error_header(rid, code, message))


def shown(value: object, limit: int = 64) -> str:
    """repr() of an offending item for an error message, cut to about `limit` characters."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def encode_bytes(header: Mapping, views: Sequence[memoryview] = ()) -> bytes:
    return b"".join(bytes(p) for p in encode_frame(header, views))


# --- decoding ------------------------------------------------------------------------------------
def frame_size(prefix: bytes | bytearray | memoryview, limits: Limits, offset: int = 0) -> tuple[int, int]:
    """(total frame bytes, header_len) from the 8 prefix bytes at `offset`; raises before anything is
    allocated (FrameTooLarge for a length over a limit, BadFrame for inconsistent lengths)."""
    body_len, header_len = PREFIX.unpack_from(prefix, offset)
    total = 4 + body_len
    if total > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame of {total} bytes exceeds max_frame_bytes {limits.max_frame_bytes}")
    if header_len > limits.max_header_bytes:
        raise FrameTooLarge(f"header of {header_len} bytes exceeds max_header_bytes {limits.max_header_bytes}")
    if total % ALIGN:
        raise BadFrame(f"frame of {total} bytes is not a multiple of {ALIGN}")
    if align8(PREFIX_SIZE + header_len) > total:
        raise BadFrame(f"header_len {header_len} does not fit in a frame of {total} bytes")
    return total, header_len


class _KeyNotString(Exception):
    pass


def _string_keys(d: dict) -> dict:
    """msgpack object_hook: every map of a header, at any depth, has string keys only."""
    for key in d:
        if type(key) is not str:
            raise _KeyNotString(key)
    return d


def decode_header(frame: memoryview, header_len: int) -> dict:
    """The msgpack map of a frame's header; BadFrame (carrying the request id in `rid` when the
    header yields one: `header_id`) when it is not valid msgpack, not a map, or a map anywhere in it
    has a key that is not a string (docs/protocol.md section 1)."""
    raw = frame[PREFIX_SIZE:PREFIX_SIZE + header_len]
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, object_hook=_string_keys)
    except _KeyNotString as exc:
        err = BadFrame(f"header: map key {shown(exc.args[0])} is not a string (map keys are strings, "
                       f"at every depth)")
    except ValueError as exc:  # msgpack refuses keys other than str / bytes itself (strict_map_key)
        text = str(exc)
        err = BadFrame(f"header: a map key is not a string ({text})" if "map key" in text else
                       f"header is not valid msgpack: {text or type(exc).__name__}")
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        err = BadFrame(f"header is not valid msgpack: {str(exc) or type(exc).__name__}")
    else:
        if type(header) is dict:
            return header
        err = BadFrame(f"header is a msgpack {type(header).__name__}, not a map")
    err.rid = header_id(raw)
    raise err


def header_id(raw) -> int:
    """The request id of a header that failed to decode: the value of its top-level map's last `id`
    entry read before the first fault, when that is an integer 1..2^64-1; else 0 (docs/protocol.md
    section 1).  Values other than the id are skipped, not built."""
    rid = 0
    try:
        u = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(raw), 1))
        u.feed(raw)
        for _ in range(u.read_map_header()):
            key = u.unpack()
            if type(key) is str and key == "id":
                value = u.unpack()
                rid = value if type(value) is int and 0 < value <= MAX_REQUEST_ID else 0
            else:
                u.skip()
    except Exception:  # noqa: BLE001 - the fault itself: what was read before it counts
        pass
    return rid


def payload_view(frame: memoryview, header_len: int) -> memoryview:
    return frame[align8(PREFIX_SIZE + header_len):]


def _shape(desc: Mapping, limits: Limits, name: str) -> tuple[int, ...]:
    shape = desc.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) > limits.max_ndim:
        raise BadRequest(f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} integers, "
                         f"got {shown(shape)}")
    extent = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:  # (bool is not int here)
            raise BadRequest(f"tensor {name!r}: shape {shown(shape)} has a dimension outside 0..2^48")
        if d:
            extent *= d
    if extent > MAX_DIM:
        raise BadRequest(f"tensor {name!r}: shape {shape!r} has an extent (the product of its dimensions, "
                         f"0 counted as 1) of {extent}, over 2^48")
    return tuple(shape)


def split_tensors(descs: object, payload: memoryview, limits: Limits) -> dict[str, tuple[str, tuple, memoryview]]:
    """Validate descriptors against the payload; {name: (dtype, shape, byte view)} without copying.

    The codes of each case are docs/protocol.md section 3.1: a field missing or of the wrong type, or
    a value out of range, is BAD_REQUEST; a descriptor that disagrees with the payload (or an unknown
    dtype name) is INVALID_INPUT.  The items of a `bytes` tensor are checked here, naming the tensor
    and the item."""
    if not isinstance(descs, (list, tuple)):
        raise BadRequest(f"tensors must be a list of descriptors, got {shown(descs)}")
    if len(descs) > limits.max_tensors:
        raise BadRequest(f"{len(descs)} tensors exceed max_tensors {limits.max_tensors}")
    out: dict[str, tuple[str, tuple, memoryview]] = {}
    off = 0
    for i, d in enumerate(descs):
        if not isinstance(d, dict):
            raise BadRequest(f"tensor #{i}: descriptor is not a map, got {shown(d)}")
        name, dtype, nbytes = d.get("name"), d.get("dtype"), d.get("nbytes")
        if type(name) is not str or not name:
            raise BadRequest(f"tensor #{i}: name must be a non-empty string, got {shown(name)}")
        # (error messages say f"tensor {name!r}"; built only when there is an error)
        if name in out:
            raise BadRequest(f"tensor {name!r}: named twice")
        if type(dtype) is not str:
            raise BadRequest(f"tensor {name!r}: dtype must be a string, got {shown(dtype)}")
        if dtype not in _WIRE_DTYPE_SET:
            raise InvalidInput(f"tensor {name!r}: unknown dtype {shown(dtype)} "
                               f"(wire dtypes: {', '.join(WIRE_DTYPES)})")
        if type(nbytes) is not int or nbytes < 0:
            raise BadRequest(f"tensor {name!r}: nbytes must be a non-negative integer, got {shown(nbytes)}")
        shape = _shape(d, limits, name)
        if dtype != BYTES_DTYPE:
            numel = 1
            for s in shape:
                numel *= s
            want = numel * DTYPES[dtype][1]
            if nbytes != want:
                raise InvalidInput(f"tensor {name!r}: nbytes is {nbytes} but {dtype} {list(shape)} needs {want}")
        elif len(shape) != 1:
            raise InvalidInput(f"tensor {name!r}: a bytes tensor must be 1-D, got shape {list(shape)}")
        if off + nbytes > payload.nbytes:
            raise InvalidInput(f"tensor {name!r}: needs payload bytes [{off}, {off + nbytes}) but the payload "
                               f"holds {payload.nbytes}")
        view = payload[off:off + nbytes]
        if dtype == BYTES_DTYPE:
            _check_items(view, shape[0], name)
        out[name] = (dtype, shape, view)
        off = align8(off + nbytes)
    if off != payload.nbytes:
        raise InvalidInput(f"payload holds {payload.nbytes} bytes, the descriptors account for {off}")
    return out


def to_array(dtype: str, shape: tuple, view: memoryview, *, torch: bool = False):
    """A numpy array (zero-copy view) for numeric dtypes, a torch tensor for bfloat16 and the float8
    dtypes (for every numeric dtype with torch=True), a list of bytes for the bytes dtype."""
    if dtype == BYTES_DTYPE:
        return split_bytes(view, shape[0])
    if torch or dtype in TORCH_ONLY_DTYPES:
        import torch as _torch

        tdt = getattr(_torch, dtype)  # the wire's dtype names are torch's
        if not view.nbytes:
            return _torch.empty(shape, dtype=tdt)
        if view.readonly:  # torch has no read-only tensors: copy rather than alias immutable bytes
            view = memoryview(bytearray(view))
        t = _torch.frombuffer(view, dtype=tdt).view(shape)
        if t.data_ptr() % TENSOR_ALIGN:
            # CPU kernels pick their code path by the data's alignment, and the paths round
            # differently (float32 matmuls differ by an ulp between 8- and 64-aligned inputs): an
            # input lands at whatever offset its frame or body put it, so a misaligned one is copied
            # (torch allocates 64-aligned) and the same input always gives the same answer
            t = t.clone()
        return t
    return np.frombuffer(view, dtype=np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<")).reshape(shape)


_U32 = struct.Struct("<I")


def _check_items(view: memoryview, count: int, name: str) -> None:
    """The items of a bytes tensor fill its bytes exactly: each a u32 little-endian length, then that
    many bytes (InvalidInput naming the tensor and the item otherwise)."""
    off, n = 0, view.nbytes
    if count * 4 > n:
        raise InvalidInput(f"tensor {name!r}: {count} bytes items need at least {count * 4} bytes "
                           f"(a u32 length each), nbytes is {n}")
    unpack = _U32.unpack_from
    for k in range(count):
        if off + 4 > n:
            raise InvalidInput(f"tensor {name!r}: item {k}: its u32 length runs past the end ({n} bytes)")
        (ln,) = unpack(view, off)
        off += 4 + ln
        if off > n:
            raise InvalidInput(f"tensor {name!r}: item {k} declares {ln} bytes, only {n - off + ln} remain")
    if off != n:
        raise InvalidInput(f"tensor {name!r}: {n - off} bytes left after its {count} items")


def split_bytes(view: memoryview, count: int, name: str = "bytes") -> list[bytes]:
    """The items of a bytes tensor (checked as `split_tensors` checks them)."""
    items, off, n = [], 0, view.nbytes
    unpack = _U32.unpack_from
    for k in range(count):
        if off + 4 > n:
            raise InvalidInput(f"tensor {name!r}: item {k}: its u32 length runs past the end ({n} bytes)")
        (ln,) = unpack(view, off)
        off += 4
        if off + ln > n:
            raise InvalidInput(f"tensor {name!r}: item {k} declares {ln} bytes, only {n - off} remain")
        items.append(bytes(view[off:off + ln]))
        off += ln
    if off != n:
        raise InvalidInput(f"tensor {name!r}: {n - off} bytes left after its {count} items")
    return items


def iter_frames(data: bytes, limits: Limits = Limits()) -> Iterable[tuple[dict, memoryview]]:
    """Decode back-to-back frames from bytes (tests, tools)."""
    mv = memoryview(data)
    pos = 0
    while pos < len(mv):
        if len(mv) - pos < PREFIX_SIZE:
            raise BadFrame("truncated frame prefix")
        total, hlen = frame_size(mv[pos:pos + PREFIX_SIZE], limits)
        if len(mv) - pos < total:
            raise BadFrame(f"truncated frame: {len(mv) - pos} of {total} bytes")
        frame = mv[pos:pos + total]
        yield decode_header(frame, hlen), payload_view(frame, hlen)
        pos += total
