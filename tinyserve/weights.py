"""The tinyserve weights file (docs/format.md): write (pack) and open (map + decode into tensors).

Writing: every tensor is encoded (in the codec backend, several threads), the header and index are
built, and the file is written to a temporary name, fsynced and renamed into place, so a reader never
sees a half-written file and a live mapping of an older file is never rewritten under it.

Reading: the header and index are read and validated with explicit reads, then the file is mapped
copy-on-write (MAP_PRIVATE, readable and writable): raw tensors are torch views of that mapping
(zero-copy until a page is written: a model writing to a buffer in place gets a private copy of that
page instead of a SIGSEGV), compressed tensors are decoded straight into fresh tensor memory.  The
mapping lives as long as any tensor viewing it.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from tinyserve import errors
from tinyserve._backend import core as _default_core
from tinyserve import spec
from tinyserve.spec import (
    DTYPES,
    ENC_PLANES,
    ENC_RAW,
    EXT_RECORD_HEADER,
    FEAT_DECODED_CHECKSUMS,
    FEAT_EXTENSIONS,
    FORMAT_VERSIONS,
    HEADER_SIZE,
    MAGIC,
    MAJOR,
    MAX_CHUNK_BYTES,
    MAX_CHUNK_COUNT,
    MAX_EXT_TAG,
    MAX_FILE_SIZE,
    MAX_INDEX_SIZE,
    MAX_NAME_LEN,
    MAX_TENSORS,
    MINOR,
    PAGE,
    ChunkInfo,
    TensorInfo,
    align_up,
    limit_message,
    shape_problem,
    tensor_alignment,
)

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
}
DTYPE_TO_TORCH = {name: dt for dt, name in TORCH_DTYPES.items()}
FLOATS = {"float32", "float16", "bfloat16", "float64"}

COMPRESSIONS = ("auto", "none", "zstd", "planes")
DEFAULT_CHUNK_BYTES = 1 << 20  # per chunk code tables adapt to local statistics; 1 MiB measured best
VERIFY_MODES = ("none", "compressed", "all")
VALIDATE_SCRATCH = 64 << 20  # bytes of decoded scratch memory verify() uses at a time


def default_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _alloc(nbytes: int, path: str, name: str) -> torch.Tensor:
    try:
        return torch.empty(nbytes, dtype=torch.uint8)
    except RuntimeError as exc:  # torch reports allocation failure as RuntimeError
        raise errors.LimitError(f"{path}: cannot allocate {nbytes} bytes for tensor {name!r}: {exc}") from None


# ------------------------------------------------------------------------------------------------
# writing


@dataclass
class TensorSummary:
    name: str
    dtype: str
    shape: tuple
    encoding: str
    raw_bytes: int
    stored_bytes: int


@dataclass
class PackSummary:
    path: str
    tensors: list[TensorSummary] = field(default_factory=list)
    file_bytes: int = 0
    seconds: float = 0.0

    @property
    def raw_bytes(self) -> int:
        return sum(t.raw_bytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.file_bytes if self.file_bytes else 1.0


def tensor_bytes(t: torch.Tensor | np.ndarray) -> tuple[str, tuple, memoryview]:
    """(dtype name, shape, a byte view of the contiguous CPU data) of a tensor or array."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(t).__name__}")
    dtype = TORCH_DTYPES.get(t.dtype)
    if dtype is None:
        raise errors.UnsupportedError(f"dtype {t.dtype} is not supported by the weights format")
    t = t.detach().to("cpu").contiguous()
    flat = t.reshape(-1).view(torch.uint8)
    return dtype, tuple(t.shape), memoryview(flat.numpy())


def _plan(dtype: str, compression: str, level: int | str | None) -> tuple[str, int, int] | None:
    """(mode, zstd level, chunk bytes) for a 'planes' attempt, or None for raw."""
    if compression == "none":
        return None
    strongest = level == "max"
    zlevel = 19 if strongest else int(level) if level is not None else 3
    if not 1 <= zlevel <= 22:
        raise errors.ConfigError(f"level {level!r} outside 1..22 (or 'max')")
    chunk = DEFAULT_CHUNK_BYTES
    if compression == "zstd":
        return "zstd", zlevel, chunk
    if compression == "planes":
        return ("max" if strongest else "huffman"), zlevel, chunk
    # auto: floats through the Huffman plane coder (close to the order-0 bound at the fastest
    # decode), other dtypes through zstd, whose matches catch repeated integers; 'max' tries zstd,
    # Huffman and rANS on every plane (rANS only where it saves 1/128, see docs/native-api.md).
    if strongest:
        return "max", zlevel, chunk
    # float16: zstd's literal coder and our Huffman decode at about the same speed on its exponent
    # plane (5 exponent + 3 mantissa bits), and zstd wins on some planes: the smaller of the two
    if dtype == "float16":
        return "zstd_huffman", zlevel, chunk
    return ("huffman" if dtype in FLOATS else "zstd"), zlevel, chunk


def _encode_tensor(core, name: str, t, compression: str, level, threads: int, min_saving: float,
                   chunk_bytes: int | None, decoded_sums: bool = True):
    dtype, shape, data = tensor_bytes(t)
    problem = shape_problem(shape)
    if problem:  # the reader's rule and message (spec.shape_problem), before any work
        raise errors.LimitError(limit_message(f"tensor {name!r}", *problem))
    isz = DTYPES[dtype][1]
    raw_bytes = data.nbytes
    plan = _plan(dtype, compression, level)
    if plan is not None and raw_bytes >= 256:
        mode, zlevel, chunk = plan
        chunk = chunk_bytes or chunk
        chunk_elems = max(1, chunk // isz)
        # format 1.1: float16 in the float16 exponent plane order (feature bit 2; 1.0: the generic order)
        f16 = {"f16_planes": True} if dtype == "float16" and decoded_sums else {}
        payload, recs = core.encode_planes(data, dtype, chunk_elems, mode, zlevel, threads, **f16)
        # keep raw when compression saves too little to pay for decoding ('auto' only)
        if compression != "auto" or len(payload) <= raw_bytes * (1.0 - min_saving):
            if decoded_sums:  # format 1.1: XXH3_64 of each chunk's decoded (= source) element bytes
                sums = core.checksum_chunks(data, chunk_elems * isz, threads)
                recs = [(r[0], r[1], r[2], d) for r, d in zip(recs, sums)]
            return dtype, shape, ENC_PLANES, chunk_elems, payload, recs
    chunk = min(chunk_bytes or DEFAULT_CHUNK_BYTES * 4, MAX_CHUNK_BYTES)
    chunk_elems = max(1, chunk // isz)
    sums = core.checksum_chunks(data, chunk_elems * isz, threads)
    return dtype, shape, ENC_RAW, chunk_elems, data, sums


def build_index(entries: list[tuple], extensions: Mapping[int, bytes] | None = None) -> tuple[bytes, list[int], int]:
    """Index bytes, each tensor's data offset and the file size for
    entries = [(name, dtype, shape, encoding, chunk_elems, data_size, chunk_records)], where a chunk
    record is a checksum (raw) or (codecs, plane_sizes, checksum[, decoded_checksum]) (planes), and
    the extension records {tag: payload} (written after the tensor records, tags ascending).
    Refuses (LimitError, the reader's limits) an index or file the reader would refuse."""
    def record_size(name, dtype, shape, enc, recs):
        per_chunk = 8 if enc == ENC_RAW else 8 + 5 * DTYPES[dtype][1] + (8 if recs and len(recs[0]) == 4 else 0)
        return 2 + len(name.encode("utf-8")) + 4 + 8 * len(shape) + 24 + per_chunk * len(recs)

    if len(entries) > MAX_TENSORS:
        raise errors.LimitError(limit_message("weights file", "tensor_count", len(entries), MAX_TENSORS))
    for e in entries:
        if len(e[6]) > MAX_CHUNK_COUNT:
            raise errors.LimitError(limit_message(f"tensor {e[0]!r}", "chunk_count", len(e[6]), MAX_CHUNK_COUNT))
    ext = sorted((extensions or {}).items())
    index_size = (sum(record_size(e[0], e[1], e[2], e[3], e[6]) for e in entries)
                  + sum(EXT_RECORD_HEADER + len(v) for _, v in ext))
    if index_size > MAX_INDEX_SIZE:
        raise errors.LimitError(limit_message("weights file", "index_size", index_size, MAX_INDEX_SIZE))
    end = align_up(HEADER_SIZE + index_size, PAGE)
    parts, offsets = [], []
    for name, dtype, shape, enc, chunk_elems, data_size, recs in entries:
        off = align_up(end, tensor_alignment(enc, data_size))
        offsets.append(off)
        end = off + data_size
        nb = name.encode("utf-8")
        parts.append(struct.pack("<H", len(nb)) + nb)
        parts.append(struct.pack(f"<BBBB{len(shape)}Q", DTYPES[dtype][0], enc, len(shape), 0, *shape))
        parts.append(struct.pack("<QQII", off, data_size, chunk_elems, len(recs)))
        if enc == ENC_RAW:
            parts.append(struct.pack(f"<{len(recs)}Q", *recs))
        else:
            for codecs, sizes, *sums in recs:
                parts.append(b"".join(struct.pack("<BI", c, s) for c, s in zip(codecs, sizes)))
                parts.append(struct.pack(f"<{len(sums)}Q", *sums))
    for tag, payload in ext:
        parts.append(struct.pack("<HI", tag, len(payload)) + bytes(payload))
    index = b"".join(parts)
    assert len(index) == index_size
    if end > MAX_FILE_SIZE:
        raise errors.LimitError(limit_message("weights file", "file_size", end, MAX_FILE_SIZE))
    return index, offsets, end


def _header(core, index: bytes, file_size: int, count: int, features: int = 0) -> bytes:
    """The 64-byte header; a file using no feature bit is written as 1.0 (minor 0), else as 1.1."""
    data_offset = align_up(HEADER_SIZE + len(index), PAGE)
    head = MAGIC + struct.pack("<HHIQQQQ", MAJOR, MINOR if features else 0, count, len(index), data_offset,
                               file_size, core.xxh3_64(index))
    return head + struct.pack("<QQ", core.xxh3_64(head), features)


def _check_extensions(extensions) -> dict[int, bytes]:
    out = {}
    for tag, payload in (extensions or {}).items():
        if not isinstance(tag, int) or isinstance(tag, bool) or not 1 <= tag <= MAX_EXT_TAG:
            raise errors.ConfigError(f"extension tag {tag!r}: must be an int in 1..{MAX_EXT_TAG}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise errors.ConfigError(f"extension {tag}: payload must be bytes, got {type(payload).__name__}")
        out[tag] = bytes(payload)
    return out


def write_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | np.ndarray], *,
                  compression: str = "auto", level: int | str | None = None, threads: int | None = None,
                  min_saving: float = 0.03, chunk_bytes: int | None = None,
                  progress: Callable[[int, int], None] | None = None, core=None, format: str = "1.1",
                  extensions: Mapping[int, bytes] | None = None) -> PackSummary:
    """Write `tensors` to `path` atomically (temp file, fsync, rename).

    compression: 'auto' (per tensor: the plane coder where it saves at least `min_saving`, else raw),
    'none' (all raw), 'zstd' (planes, each through zstd at `level`), 'planes' (planes through the
    Huffman coder).  level: 1..22 for zstd, or 'max' for the strongest (slowest) setting.
    progress(done_bytes, total_bytes) is called after each tensor.
    format: '1.1' (default: 'planes' chunks carry decoded checksums) or '1.0' (what 1.0 readers read).
    extensions: {tag: payload} optional extension records (format 1.1, docs/format.md section 3.1).
    A file the reader would refuse (docs/format.md section 9) is refused here with the same limit."""
    core = core or _default_core
    if compression not in COMPRESSIONS:
        raise errors.ConfigError(f"compression {compression!r} is not one of {COMPRESSIONS}")
    if chunk_bytes is not None and not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise errors.ConfigError(f"chunk_bytes {chunk_bytes} outside 1..{MAX_CHUNK_BYTES}")
    if format not in FORMAT_VERSIONS:
        raise errors.ConfigError(f"format {format!r} is not one of {FORMAT_VERSIONS}")
    extensions = _check_extensions(extensions)
    if extensions and format == "1.0":
        raise errors.ConfigError("extension records need format 1.1")
    threads = threads or default_threads()
    t0 = time.perf_counter()
    names = list(tensors)
    if len(names) > MAX_TENSORS:
        raise errors.LimitError(limit_message("weights file", "tensor_count", len(names), MAX_TENSORS))
    for name in names:
        if not isinstance(name, str) or not name or "\0" in name:
            raise errors.FormatError(f"tensor name {name!r}: must be 1..{MAX_NAME_LEN} UTF-8 bytes without NUL")
        if len(name.encode("utf-8")) > MAX_NAME_LEN:
            raise errors.LimitError(limit_message(f"tensor {name[:64]!r}...", "name_len", len(name.encode("utf-8")),
                                                  MAX_NAME_LEN))
    total = sum(tensor_bytes(tensors[n])[2].nbytes for n in names) if progress else 0
    done = 0
    encoded, summary = [], PackSummary(str(path))
    for name in names:
        dtype, shape, enc, chunk_elems, payload, recs = _encode_tensor(
            core, name, tensors[name], compression, level, threads, min_saving, chunk_bytes, format != "1.0")
        encoded.append((name, dtype, shape, enc, chunk_elems, len(payload) if enc else payload.nbytes, recs,
                        payload))
        raw = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1] if shape else DTYPES[dtype][1]
        summary.tensors.append(TensorSummary(name, dtype, shape, "planes" if enc else "raw", raw,
                                             encoded[-1][5]))
        done += raw
        if progress:
            progress(done, total)
    features = 0
    if any(e[3] == ENC_PLANES for e in encoded) and format != "1.0":
        features |= FEAT_DECODED_CHECKSUMS
    if extensions:
        features |= FEAT_EXTENSIONS
    if any(e[3] == ENC_PLANES and e[1] == "float16" for e in encoded) and format != "1.0":
        features |= spec.FEAT_FLOAT16_PLANES
    index, offsets, file_size = build_index([e[:7] for e in encoded], extensions)
    header = _header(core, index, file_size, len(encoded), features)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(index)
            pos = HEADER_SIZE + len(index)
            for off, e in zip(offsets, encoded):
                f.write(b"\0" * (off - pos))
                f.write(e[7])
                pos = off + e[5]
            assert pos == file_size or not encoded, (pos, file_size)
            if not encoded:
                f.write(b"\0" * (file_size - pos))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    summary.file_bytes = file_size
    summary.seconds = time.perf_counter() - t0
    return summary


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# reading


@dataclass
class LoadStats:
    """Where the time of the last load went (seconds) and how many bytes each path handled."""

    decode_s: float = 0.0
    verify_raw_s: float = 0.0
    raw_bytes: int = 0
    decoded_bytes: int = 0
    verified_compressed: bool = False
    verified_raw: bool = False


class WeightsFile:
    """An open weights file.  `tensors` maps names to TensorInfo in file order."""

    def __init__(self, path: str | os.PathLike, *, core=None):
        self.path = os.fspath(path)
        self._core = core or _default_core
        self.last_load = LoadStats()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_SIZE, 0)
            self.header = self._core.parse_header(head)
            if size != self.header.file_size:
                cls = errors.TruncatedError if size < self.header.file_size else errors.LayoutError
                raise cls(f"{self.path}: file holds {size} bytes, its header declares {self.header.file_size}")
            index = os.pread(fd, self.header.index_size, HEADER_SIZE)
            try:
                infos = self._core.parse_index(self.header, index)
            except errors.TinyserveError as exc:
                raise type(exc)(f"{self.path}: {exc}") from None
            self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}
            self.extensions: dict[int, bytes] = _extensions(self.header, index, infos)
            # feature bit 2: float16 'planes' tensors are in the float16 exponent plane order; every
            # decode of this file passes it to the codec (f16_planes=True)
            self.f16_planes = bool(self.header.features & spec.FEAT_FLOAT16_PLANES)
            self._f16 = {"f16_planes": True} if self.f16_planes else {}
            # copy-on-write: readable + writable, private (see module docstring)
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._check_padding()

    def _check_padding(self) -> None:
        """Every padding byte (after the index, between tensors) MUST be zero: checked at every open."""
        gaps = [(HEADER_SIZE + self.header.index_size, self.header.data_offset)]
        end = self.header.data_offset
        for info in self.tensors.values():
            gaps.append((end, info.data_offset))
            end = info.data_offset + info.data_size
        for a, b in gaps:
            if b > a and np.frombuffer(self._map, dtype=np.uint8, count=b - a, offset=a).any():
                raise errors.LayoutError(f"{self.path}: padding bytes [{a}, {b}) are not zero")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Drop this object's reference to the mapping; tensors viewing it keep it alive."""
        self._map = None

    @property
    def mapping(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._map

    def load(self, names: Iterable[str] | None = None, *, verify: str = "compressed",
             threads: int | None = None, max_decoded_bytes: int | None = None) -> dict[str, torch.Tensor]:
        """Tensors by name: raw ones as zero-copy views of the mapping, compressed ones decoded.

        verify: 'none', 'compressed' (check each compressed chunk as it is decoded: cheap) or 'all'
        (also hash every raw chunk: a full pass over the raw bytes, timed apart in last_load).
        max_decoded_bytes (default: this machine's physical memory) caps the memory compressed
        tensors may claim: a small valid file can declare terabytes of fill chunks."""
        if verify not in VERIFY_MODES:
            raise errors.ConfigError(f"verify {verify!r} is not one of {VERIFY_MODES}")
        threads = threads or default_threads()
        infos = [self._info(n) for n in (self.tensors if names is None else names)]
        limit = physical_memory() if max_decoded_bytes is None else max_decoded_bytes
        need = sum(i.nbytes for i in infos if i.encoding != "raw")
        if need > limit:
            raise errors.LimitError(f"{self.path}: decoding needs {need} bytes of memory, more than the limit "
                                    f"{limit} (max_decoded_bytes)")
        stats = LoadStats(verified_compressed=verify != "none", verified_raw=verify == "all")
        out: dict[str, torch.Tensor] = {}
        jobs = []
        for info in infos:
            tdtype = DTYPE_TO_TORCH[info.dtype]
            if info.encoding == "raw":
                if info.nbytes:
                    flat = torch.frombuffer(self.mapping, dtype=torch.uint8, count=info.nbytes,
                                            offset=info.data_offset)
                else:
                    flat = torch.empty(0, dtype=torch.uint8)
                out[info.name] = flat.view(tdtype).reshape(info.shape)
                stats.raw_bytes += info.nbytes
            else:
                flat = _alloc(info.nbytes, self.path, info.name)
                jobs.append((info, flat.numpy()))
                out[info.name] = flat.view(tdtype).reshape(info.shape)
                stats.decoded_bytes += info.nbytes
        t0 = time.perf_counter()
        if jobs:
            self._core.decode_into(self.mapping, jobs, verify != "none", threads, **self._f16)
        t1 = time.perf_counter()
        if verify == "all":
            raw = [i for i in infos if i.encoding == "raw"]
            bad = self._core.verify_chunks(self.mapping, raw, threads)
            if bad:
                raise errors.ChecksumError(f"{self.path}: checksum mismatch in {_describe_bad(bad)}")
        stats.decode_s, stats.verify_raw_s = t1 - t0, time.perf_counter() - t1
        for info in infos:
            if info.dtype == "bool":
                self._check_bool(info, out[info.name].reshape(-1).view(torch.uint8).numpy())
        self.last_load = stats
        return out

    def _check_bool(self, info: TensorInfo, u8: np.ndarray, first: int = 0) -> None:
        """A bool element MUST be the byte 0 or 1 (docs/format.md section 3)."""
        bad = np.flatnonzero(u8 > 1)
        if bad.size:
            k = int(bad[0])
            raise errors.CorruptDataError(f"{self.path}: tensor {info.name!r}: bool element {first + k} is the byte "
                                          f"{int(u8[k]):#04x}; bool elements MUST be 0 or 1")

    def load_into(self, dst: Mapping[str, torch.Tensor], *, verify: str = "compressed",
                  threads: int | None = None) -> LoadStats:
        """Decode (compressed) or copy (raw) the named tensors into the caller's existing CPU tensors,
        which must match in dtype and shape and be contiguous.  Memory that is already paged in
        takes no page faults: this is how a host buffer (e.g. a pinned pool) is refilled.  verify as
        in load(); with 'compressed', raw chunks are copied unverified."""
        if verify not in VERIFY_MODES:
            raise errors.ConfigError(f"verify {verify!r} is not one of {VERIFY_MODES}")
        threads = threads or default_threads()
        raw_jobs, packed_jobs = [], []
        stats = LoadStats(verified_compressed=verify != "none", verified_raw=verify == "all")
        for name, t in dst.items():
            info = self._info(name)
            want = DTYPE_TO_TORCH[info.dtype]
            if t.dtype != want or tuple(t.shape) != info.shape or t.device.type != "cpu" or not t.is_contiguous():
                raise errors.DestinationError(
                    f"{self.path}: tensor {name!r} is {info.dtype} {list(info.shape)}; the destination is "
                    f"{t.dtype} {list(t.shape)} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
            view = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
            (raw_jobs if info.encoding == "raw" else packed_jobs).append((info, view))
            if info.encoding == "raw":
                stats.raw_bytes += info.nbytes
            else:
                stats.decoded_bytes += info.nbytes
        t0 = time.perf_counter()
        if packed_jobs:
            self._core.decode_into(self.mapping, packed_jobs, verify != "none", threads, **self._f16)
        t1 = time.perf_counter()
        if raw_jobs:
            self._core.decode_into(self.mapping, raw_jobs, verify == "all", threads)
        stats.decode_s, stats.verify_raw_s = t1 - t0, time.perf_counter() - t1
        for info, view in raw_jobs + packed_jobs:
            if info.dtype == "bool":
                self._check_bool(info, view)
        self.last_load = stats
        return stats

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def verify(self, threads: int | None = None, scratch_bytes: int = VALIDATE_SCRATCH) -> None:
        """THE validation routine (docs/format.md section 8): everything the format says MUST hold.

        Opening already checked the header, the index, the placement and every padding byte; this
        re-checks the padding, then every chunk's stored checksum (ChecksumError lists every bad chunk),
        then decodes every 'planes' chunk into scratch memory (at most `scratch_bytes` at a time, or one
        chunk), so every codec rule and every decoded checksum is checked, and checks that every bool
        element is 0 or 1.  Used by verify_file (and so by installs) and by load(verify='all') callers
        that want the whole file checked."""
        threads = threads or default_threads()
        self._check_padding()
        infos = list(self.tensors.values())
        bad = self._core.verify_chunks(self.mapping, infos, threads)
        if bad:
            raise errors.ChecksumError(f"{self.path}: checksum mismatch in {_describe_bad(bad)}")
        scratch = np.empty(max(1, scratch_bytes), np.uint8)
        batch, used = [], 0
        for info in infos:
            if info.encoding == "raw":
                if info.dtype == "bool" and info.nbytes:
                    self._check_bool(info, np.frombuffer(self.mapping, np.uint8, info.nbytes, info.data_offset))
                continue
            for part, first, nbytes in _chunk_runs(info, scratch.size):
                if used + nbytes > scratch.size and batch:
                    self._decode_batch(batch, scratch, threads)
                    batch, used = [], 0
                if nbytes > scratch.size:
                    scratch = np.empty(nbytes, np.uint8)
                batch.append((info, part, first, used, nbytes))
                used += nbytes
        if batch:
            self._decode_batch(batch, scratch, threads)

    def _decode_batch(self, batch, scratch: np.ndarray, threads: int) -> None:
        jobs = [(part, scratch[at:at + nbytes]) for _, part, _, at, nbytes in batch]
        try:
            self._core.decode_into(self.mapping, jobs, True, threads, **self._f16)
        except errors.TinyserveError as exc:
            msg = str(exc)
            for info, part, first, _, _ in batch:  # a run's chunk numbers count from the run's first chunk
                k0 = first // info.chunk_elems
                if k0:
                    msg = re.sub(rf"(tensor {re.escape(repr(info.name))} chunk )(\d+)",
                                 lambda m, k0=k0: m.group(1) + str(int(m.group(2)) + k0), msg)
            raise type(exc)(f"{self.path}: {msg}") from None
        for info, _, first, at, nbytes in batch:
            if info.dtype == "bool":
                self._check_bool(info, scratch[at:at + nbytes], first)


def _chunk_runs(info: TensorInfo, budget: int):
    """(sub-tensor, first element, decoded bytes) for runs of consecutive chunks of a 'planes' tensor
    whose decoded bytes fit `budget` (one chunk at least): each run is a TensorInfo of its own (a flat
    tensor of the run's elements and chunks), so it can be decoded into a slice of scratch memory."""
    isz = DTYPES[info.dtype][1]
    per = max(1, budget // max(1, info.chunk_elems * isz))
    numel = info.numel
    for k0 in range(0, len(info.chunks), per):
        chunks = info.chunks[k0:k0 + per]
        first = k0 * info.chunk_elems
        n = min(numel, first + len(chunks) * info.chunk_elems) - first
        part = info._replace(shape=(n,), data_offset=chunks[0].offset, data_size=sum(c.size for c in chunks),
                             chunks=chunks)
        yield part, first, n * isz


def _extensions(header, index: bytes, infos: list[TensorInfo]) -> dict[int, bytes]:
    """The extension records (docs/format.md section 3.1) of an index both backends validated."""
    if not header.features & FEAT_EXTENSIONS:
        return {}
    pos = 0
    for t in infos:
        isz = DTYPES[t.dtype][1]
        rec = 8 if t.encoding == "raw" else 8 + 5 * isz + (8 if header.features & FEAT_DECODED_CHECKSUMS else 0)
        pos += 2 + len(t.name.encode("utf-8")) + 4 + 8 * len(t.shape) + 24 + rec * len(t.chunks)
    from tinyserve._fallback.core import extension_records

    return dict(extension_records(bytes(index[:header.index_size]), pos))


def _describe_bad(bad: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"tensor {n!r} chunk {k}" for n, k in bad[:10])
    return shown + (f" and {len(bad) - 10} more chunks" if len(bad) > 10 else "")


def load_file(path: str | os.PathLike, *, verify: str = "compressed", threads: int | None = None,
              core=None) -> dict[str, torch.Tensor]:
    with WeightsFile(path, core=core) as f:
        return f.load(verify=verify, threads=threads)


def verify_file(path: str | os.PathLike, threads: int | None = None, core=None) -> None:
    """Validate everything docs/format.md says MUST hold: header, index, placement, padding, every
    chunk's stored checksum, every codec rule and decoded checksum (a full decode into scratch) and
    every bool element (WeightsFile.verify).  A file that passes loads."""
    with WeightsFile(path, core=core) as f:
        f.verify(threads)


def chunk_info_from_records(data_offset: int, recs) -> tuple[ChunkInfo, ...]:
    """ChunkInfo tuples for planes chunk records laid out from data_offset (used by tests and tools)."""
    out, off = [], data_offset
    for codecs, sizes, checksum in recs:
        out.append(ChunkInfo(off, sum(sizes), checksum, tuple(codecs), tuple(sizes)))
        off += sum(sizes)
    return tuple(out)
