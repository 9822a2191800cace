"""Pure-Python twin of the native codec (docs/native-api.md).

This module is the test oracle for ``tinyserve._native._core`` and the fallback used when the
extension is absent.  It implements docs/format.md (the weights format) with numpy, zstandard and
xxhash only.  Correctness comes first; the hot loops are vectorised with numpy where that is simple.

Error classes (all from ``tinyserve.errors``) and what raises them:

* ``TruncatedError``   - a buffer, the header, an index record or a chunk ends before its declared bytes
* ``LimitError``       - a documented limit is broken or an integer would overflow 2^64
* ``LayoutError``      - offsets/sizes are inconsistent (placement, chunk_count, data_size, file_size)
* ``UnsupportedError`` - unknown major version, dtype, encoding, codec, non-zero flags or reserved field
* ``ChecksumError``    - header, index or chunk checksum mismatch
* ``CorruptDataError`` - a zstd frame, Huffman stream or rANS stream is malformed
* ``FormatError``      - anything else wrong with the file (magic, names)
* ``DestinationError`` - a destination buffer is not writable, not contiguous or of the wrong size
* ``ConfigError``      - bad arguments to the encoder (unknown dtype name or mode, bad chunk_elems)
"""

from __future__ import annotations

import heapq
import struct
from fractions import Fraction

import numpy as np
import xxhash
import zstandard

from tinyserve import spec
from tinyserve._native import codec_rules as R
from tinyserve.spec import ChunkInfo, Header, TensorInfo
from tinyserve.errors import (
    ChecksumError,
    ConfigError,
    CorruptDataError,
    DestinationError,
    FormatError,
    LayoutError,
    LimitError,
    TruncatedError,
    UnsupportedError,
)

__all__ = [
    "ChunkInfo",
    "Header",
    "TensorInfo",
    "checksum_chunks",
    "decode_into",
    "decode_stream",
    "encode_planes",
    "parse_header",
    "parse_index",
    "validate_chunks",
    "verify_chunks",
    "xxh3_64",
    "zstd_version",
]

_U64 = 1 << 64
_HUFF_BITS = spec.HUFFMAN_MAX_BITS
_HUFF_TABLE = 1 << _HUFF_BITS  # 2048: the Kraft sum of a complete code, and the LUT size
_HUFF_HEADER = 140  # 128 bytes of code lengths + 3 x u32 sub-stream sizes
_RANS_BITS = 12
_RANS_M = 1 << _RANS_BITS  # 4096: the frequencies' sum
_RANS_L = 1 << 16  # the states' lower bound; every state ends (decoder) / starts (encoder) here
_RANS_STATES = 8
_RANS_MIN_SIZE = 256 + 4 * _RANS_STATES  # 256 one-byte varints and the states, no word
_CODEC_RANS = spec.CODEC_RANS
_CODECS = frozenset(spec.CODECS) | {_CODEC_RANS}
_MODES = ("huffman", "zstd", "rans", "max", "zstd_huffman")


# --------------------------------------------------------------------------------------------------
# buffers
# --------------------------------------------------------------------------------------------------
def _u8(buf, what: str) -> np.ndarray:
    """A read-only-or-not 1-D uint8 numpy view of any buffer-protocol object (copied if strided)."""
    if isinstance(buf, np.ndarray):
        arr = buf if buf.flags.c_contiguous else np.ascontiguousarray(buf)
        return arr.reshape(-1).view(np.uint8)
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{what}: expected a buffer-protocol object, got {type(buf).__name__}") from None
    if mv.nbytes == 0:
        return np.zeros(0, np.uint8)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return np.frombuffer(mv, dtype=np.uint8)


def zstd_version() -> tuple[int, int, int]:
    """The libzstd version python-zstandard runs on (its bundled copy), as (major, minor, patch)."""
    return tuple(zstandard.ZSTD_VERSION)


def xxh3_64(data) -> int:
    """XXH3 64-bit, seed 0, of any buffer-protocol object."""
    if isinstance(data, (bytes, bytearray)):
        return xxhash.xxh3_64_intdigest(data)
    return xxhash.xxh3_64_intdigest(_u8(data, "xxh3_64"))


# --------------------------------------------------------------------------------------------------
# header and index
# --------------------------------------------------------------------------------------------------
_HEADER = struct.Struct("<8sHHIQQQQQQ")
assert _HEADER.size == spec.HEADER_SIZE


def _check_header_fields(major, tensor_count, index_size, data_offset, file_size) -> None:
    if major != spec.MAJOR:
        raise UnsupportedError(
            f"header field major: version {major} is not supported (this reader reads major {spec.MAJOR})"
        )
    if tensor_count > spec.MAX_TENSORS:
        raise LimitError(f"header field tensor_count: {tensor_count} exceeds the limit {spec.MAX_TENSORS}")
    if index_size > spec.MAX_INDEX_SIZE:
        raise LimitError(f"header field index_size: {index_size} exceeds the limit {spec.MAX_INDEX_SIZE} (64 MiB)")
    expected = spec.align_up(spec.HEADER_SIZE + index_size, spec.PAGE)
    if data_offset != expected:
        raise LayoutError(
            f"header field data_offset: {data_offset} must equal align_up(64 + index_size, 4096) = {expected}"
        )
    if file_size > spec.MAX_FILE_SIZE:
        raise LimitError(f"header field file_size: {file_size} exceeds the limit 2^56")
    if file_size < data_offset:
        raise LayoutError(f"header field file_size: {file_size} is smaller than data_offset {data_offset}")


def parse_header(buf) -> Header:
    """Parse and check the 64-byte header (docs/format.md section 2) at the start of ``buf``."""
    u8 = _u8(buf, "header")
    if u8.size < spec.HEADER_SIZE:
        raise TruncatedError(f"header: need {spec.HEADER_SIZE} bytes, the buffer holds {u8.size}")
    raw = u8[: spec.HEADER_SIZE].tobytes()
    (magic, major, minor, tensor_count, index_size, data_offset, file_size, index_checksum, header_checksum,
     features) = _HEADER.unpack(raw)
    if magic != spec.MAGIC:
        raise FormatError(f"header field magic: {magic!r} is not {spec.MAGIC!r} (not a tinyserve weights file)")
    if major != spec.MAJOR:
        raise UnsupportedError(
            f"header field major: version {major} is not supported (this reader reads major {spec.MAJOR})"
        )
    actual = xxhash.xxh3_64_intdigest(raw[:48])
    if header_checksum != actual:
        raise ChecksumError(
            f"header field header_checksum: stored {header_checksum:#018x}, XXH3 of header bytes 0..47 "
            f"is {actual:#018x}"
        )
    problem = spec.features_problem(features)
    if problem:
        raise UnsupportedError(problem)
    _check_header_fields(major, tensor_count, index_size, data_offset, file_size)
    return Header(major, minor, tensor_count, index_size, data_offset, file_size, index_checksum, features)


_REC_FIXED = struct.Struct("<BBBB")
_REC_TAIL = struct.Struct("<QQII")
_PLANE_REC = {}


def _plane_record(nplanes: int, decoded_sum: bool = False) -> struct.Struct:
    """A planes chunk record: (codec, size) per plane, the stored checksum and, with feature bit 0
    (decoded checksums), the decoded checksum."""
    st = _PLANE_REC.get((nplanes, decoded_sum))
    if st is None:
        st = _PLANE_REC[nplanes, decoded_sum] = struct.Struct("<" + "BI" * nplanes + ("QQ" if decoded_sum else "Q"))
    return st


def _numel(shape, where: str) -> int:
    """Product of the dimensions.  Every dimension <= 2^48, and the product with zero dimensions
    counted as 1 <= 2^48 too, so an empty tensor cannot declare strides that overflow.  The rule and
    its message are spec.shape_problem / spec.limit_message, which the writer uses too."""
    problem = spec.shape_problem(shape)
    if problem:
        raise LimitError(spec.limit_message(where, *problem))
    n = 1
    for dim in shape:
        n *= dim
    return n


def _chunk_lengths(numel: int, chunk_elems: int, count: int):
    """n_k of every chunk (generator)."""
    for k in range(count):
        yield min(chunk_elems, numel - k * chunk_elems)


def parse_index(header: Header, index_buf) -> list[TensorInfo]:
    """Parse and check the index (docs/format.md sections 2-4, everything that needs only header+index)."""
    _check_header_fields(header.major, header.tensor_count, header.index_size, header.data_offset,
                         header.file_size)
    isz = header.index_size
    u8 = _u8(index_buf, "index")
    if u8.size < isz:
        raise TruncatedError(f"index: index_size is {isz} bytes, the buffer holds {u8.size}")
    data = u8[:isz].tobytes()
    actual = xxhash.xxh3_64_intdigest(data)
    if actual != header.index_checksum:
        raise ChecksumError(
            f"header field index_checksum: stored {header.index_checksum:#018x}, XXH3 of the index is {actual:#018x}"
        )

    decoded_sums = bool(header.features & spec.FEAT_DECODED_CHECKSUMS)
    problem = spec.features_problem(header.features)
    if problem:
        raise UnsupportedError(problem)
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    pos = 0
    prev_end = header.data_offset
    for i in range(header.tensor_count):
        where = f"index record of tensor #{i}"

        def need(nbytes: int, field: str) -> None:
            if pos + nbytes > isz:
                raise TruncatedError(
                    f"{where}: field {field} ({nbytes} bytes at index offset {pos}) runs past the end of the "
                    f"index (index_size {isz})"
                )

        need(2, "name_len")
        (name_len,) = struct.unpack_from("<H", data, pos)
        pos += 2
        if name_len == 0:
            raise FormatError(f"{where}: name_len 0, a tensor name must not be empty")
        if name_len > spec.MAX_NAME_LEN:
            raise LimitError(f"{where}: name_len {name_len} exceeds the limit {spec.MAX_NAME_LEN}")
        need(name_len, "name")
        raw_name = data[pos:pos + name_len]
        pos += name_len
        if b"\x00" in raw_name:
            raise FormatError(f"{where}: name {raw_name!r} contains a NUL byte")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{where}: name {raw_name!r} is not valid UTF-8 ({e.reason})") from None
        if name in names:
            raise FormatError(f"tensor {name!r} (#{i}): duplicate name, names must be unique")
        names.add(name)
        where = f"tensor {name!r}"

        need(4, "dtype")
        dtype_code, enc_code, ndim, flags = _REC_FIXED.unpack_from(data, pos)
        pos += 4
        if dtype_code not in spec.DTYPE_BY_CODE:
            raise UnsupportedError(f"{where}: dtype code {dtype_code} is not a known dtype")
        dtype, itemsize = spec.DTYPE_BY_CODE[dtype_code]
        if enc_code not in spec.ENCODINGS:
            raise UnsupportedError(f"{where}: encoding code {enc_code} is not 0 (raw) or 1 (planes)")
        encoding = spec.ENCODINGS[enc_code]
        if ndim > spec.MAX_NDIM:
            raise LimitError(spec.limit_message(where, "ndim", ndim, spec.MAX_NDIM))
        if flags != 0:
            raise UnsupportedError(f"{where}: flags {flags:#x} must be 0")

        need(8 * ndim, "shape")
        shape = struct.unpack_from(f"<{ndim}Q", data, pos)
        pos += 8 * ndim
        numel = _numel(shape, where)

        need(_REC_TAIL.size, "data_offset")
        data_offset, data_size, chunk_elems, chunk_count = _REC_TAIL.unpack_from(data, pos)
        pos += _REC_TAIL.size
        if chunk_elems < 1:
            raise LayoutError(f"{where}: chunk_elems {chunk_elems} must be >= 1")
        if chunk_elems * itemsize > spec.MAX_CHUNK_BYTES:
            raise LimitError(
                f"{where}: chunk_elems {chunk_elems} x itemsize {itemsize} exceeds the chunk limit "
                f"{spec.MAX_CHUNK_BYTES} bytes (16 MiB)"
            )
        expected_count = -(-numel // chunk_elems)
        if chunk_count != expected_count:
            raise LayoutError(
                f"{where}: chunk_count {chunk_count} must equal ceil(numel {numel} / chunk_elems {chunk_elems}) "
                f"= {expected_count}"
            )
        if encoding == "raw" and data_size != numel * itemsize:
            raise LayoutError(
                f"{where}: raw data_size {data_size} must equal numel {numel} x itemsize {itemsize} "
                f"= {numel * itemsize}"
            )

        # placement (section 4), checked before the chunks so offsets below are known to be sane
        align = spec.tensor_alignment(enc_code, data_size)
        expected_off = spec.align_up(prev_end, align)
        if data_offset != expected_off:
            kind = "a hole after" if data_offset > expected_off else "an overlap with"
            raise LayoutError(
                f"{where}: data_offset {data_offset} must equal align_up({prev_end}, {align}) = {expected_off} "
                f"({kind} the previous data)"
            )
        end = data_offset + data_size
        if end >= _U64:
            raise LimitError(f"{where}: data_offset {data_offset} + data_size {data_size} overflows 2^64")
        if end > header.file_size:
            raise LayoutError(f"{where}: data ends at {end}, past file_size {header.file_size}")

        chunks: list[ChunkInfo] = []
        if encoding == "raw":
            need(8 * chunk_count, "chunks")
            sums = struct.unpack_from(f"<{chunk_count}Q", data, pos)
            pos += 8 * chunk_count
            off = data_offset
            for k, (n_k, cs) in enumerate(zip(_chunk_lengths(numel, chunk_elems, chunk_count), sums)):
                size = n_k * itemsize
                chunks.append(ChunkInfo(off, size, cs, (), ()))
                off += size
        else:
            nplanes = itemsize
            st = _plane_record(nplanes, decoded_sums)
            need(st.size * chunk_count, "chunks")
            off = data_offset
            total = 0
            valid_codecs = _CODECS
            for k, n_k in enumerate(_chunk_lengths(numel, chunk_elems, chunk_count)):
                rec = st.unpack_from(data, pos)
                pos += st.size
                dsum = None
                if decoded_sums:
                    dsum, rec = rec[-1], rec[:-1]
                codecs = rec[0:-1:2]
                sizes = rec[1:-1:2]
                for p in range(nplanes):
                    codec, size = codecs[p], sizes[p]
                    cwhere = f"{where} chunk {k} plane {p}"
                    if codec not in valid_codecs:
                        raise UnsupportedError(f"{cwhere}: codec {codec} is not a known codec (0..4)")
                    if size > n_k:
                        raise LimitError(f"{cwhere}: stored size {size} exceeds the plane's {n_k} decoded bytes")
                    if codec == spec.CODEC_STORED and size != n_k:
                        raise LayoutError(f"{cwhere}: codec stored needs size == {n_k}, got size {size}")
                    if codec == spec.CODEC_FILL and size != 1:
                        raise LayoutError(f"{cwhere}: codec fill needs size == 1, got size {size}")
                    if size == 0:
                        raise LayoutError(f"{cwhere}: stored size 0 (every plane holds at least 1 byte)")
                csize = sum(sizes)
                chunks.append(ChunkInfo(off, csize, rec[-1], tuple(codecs), tuple(sizes), dsum))
                off += csize
                total += csize
            if total != data_size:
                raise LayoutError(f"{where}: planes data_size {data_size} must equal the sum of chunk sizes {total}")

        prev_end = end
        tensors.append(TensorInfo(name, dtype, encoding, tuple(shape), data_offset, data_size, chunk_elems,
                                  tuple(chunks)))

    if header.features & spec.FEAT_EXTENSIONS:
        extension_records(data, pos)
        pos = isz
    if pos != isz:
        raise LayoutError(f"index: {isz - pos} bytes left over after the last tensor record (index_size {isz})")
    if header.file_size != prev_end:
        raise LayoutError(
            f"header field file_size: {header.file_size} must equal the end of the last tensor's data {prev_end}"
        )
    return tensors


def extension_records(index: bytes, pos: int) -> list[tuple[int, bytes]]:
    """The (tag, payload) extension records from index offset ``pos`` (right after the last tensor record)
    to the end of the index (docs/format.md section 3.1); raises on a malformed area."""
    out = []
    prev = 0
    isz = len(index)
    while pos < isz:
        if isz - pos < spec.EXT_RECORD_HEADER:
            raise TruncatedError(f"index: extension record at index offset {pos} needs {spec.EXT_RECORD_HEADER} "
                                 f"header bytes, {isz - pos} are left (index_size {isz})")
        tag, length = struct.unpack_from("<HI", index, pos)
        if tag == 0:
            raise LayoutError(f"index: extension record at index offset {pos}: extension tag 0 is not allowed")
        if tag <= prev:
            raise LayoutError(f"index: extension record at index offset {pos}: extension tag {tag} must be greater "
                              f"than the previous tag {prev} (tags strictly ascending)")
        pos += spec.EXT_RECORD_HEADER
        if length > isz - pos:
            raise TruncatedError(f"index: extension record {tag}: extension length {length} runs past the end of "
                                 f"the index ({isz - pos} bytes left)")
        out.append((tag, bytes(index[pos:pos + length])))
        pos += length
        prev = tag
    return out


# --------------------------------------------------------------------------------------------------
# plane regrouping (section 5)
# --------------------------------------------------------------------------------------------------
def _split_planes(u8: np.ndarray, dtype: str, itemsize: int, f16_planes: bool = False) -> np.ndarray:
    """(itemsize, numel) uint8 array: plane p of every element.  f16_planes: float16 uses the
    exponent-planes order (feature "float16 exponent planes"), the bfloat16 formula."""
    numel = u8.size // itemsize
    if itemsize == 1:
        return u8.reshape(1, numel)
    if dtype == "bfloat16" or (f16_planes and dtype == "float16"):
        x = u8.view("<u2")
        out = np.empty((2, numel), np.uint8)
        out[0] = ((x >> 7) & 0xFF).astype(np.uint8)
        out[1] = (((x >> 8) & 0x80) | (x & 0x7F)).astype(np.uint8)
        return out
    if dtype == "float32":
        x = u8.view("<u4")
        out = np.empty((4, numel), np.uint8)
        out[0] = ((x >> 23) & 0xFF).astype(np.uint8)
        out[1] = (((x >> 24) & 0x80) | ((x >> 16) & 0x7F)).astype(np.uint8)
        out[2] = ((x >> 8) & 0xFF).astype(np.uint8)
        out[3] = (x & 0xFF).astype(np.uint8)
        return out
    return np.ascontiguousarray(u8.reshape(numel, itemsize)[:, ::-1].T)


def _merge_planes(planes: np.ndarray, dtype: str, itemsize: int, dst: np.ndarray, f16_planes: bool = False) -> None:
    """Inverse of _split_planes: write the elements of (itemsize, n) planes into the uint8 array dst."""
    if itemsize == 1:
        dst[:] = planes[0]
        return
    if dtype == "bfloat16" or (f16_planes and dtype == "float16"):
        p0 = planes[0].astype(np.uint16)
        p1 = planes[1].astype(np.uint16)
        dst.view("<u2")[:] = ((p1 & 0x80) << 8) | (p0 << 7) | (p1 & 0x7F)
        return
    if dtype == "float32":
        p0 = planes[0].astype(np.uint32)
        p1 = planes[1].astype(np.uint32)
        x = ((p1 & 0x80) << 24) | (p0 << 23) | ((p1 & 0x7F) << 16)
        x |= planes[2].astype(np.uint32) << 8
        x |= planes[3]
        dst.view("<u4")[:] = x
        return
    dst.reshape(-1, itemsize)[:, ::-1] = planes.T


# --------------------------------------------------------------------------------------------------
# Huffman (section 6 and the determinism rules of docs/native-api.md)
# --------------------------------------------------------------------------------------------------
def _huffman_lengths(counts: list[int]) -> list[int]:
    """Code lengths (0 = absent) for symbol counts with >= 2 present symbols, per the determinism rules."""
    leaves = sorted((c, s) for s, c in enumerate(counts) if c > 0)
    m = len(leaves)
    assert m >= 2
    weight = [c for c, _ in leaves]
    parent = [0] * (2 * m - 1)
    internal: list[int] = []  # FIFO of internal node ids, in creation order
    li = ii = 0

    for _ in range(m - 1):
        pair = []
        for _take in range(2):
            if li < m and (ii >= len(internal) or weight[li] <= weight[internal[ii]]):
                pair.append(li)
                li += 1
            else:
                pair.append(internal[ii])
                ii += 1
        node = len(weight)
        weight.append(weight[pair[0]] + weight[pair[1]])
        parent[pair[0]] = parent[pair[1]] = node
        internal.append(node)

    depth = [0] * (2 * m - 1)
    for node in range(2 * m - 3, -1, -1):  # parents have larger ids than their children
        depth[node] = depth[parent[node]] + 1

    lens = [0] * 256
    for leaf, (_, s) in enumerate(leaves):
        lens[s] = min(depth[leaf], _HUFF_BITS)
    present = [s for _, s in leaves]
    kraft = sum(1 << (_HUFF_BITS - lens[s]) for s in present)
    while kraft > _HUFF_TABLE:
        # largest len < 11, ties by smallest count, then largest symbol
        s = max((s for s in present if lens[s] < _HUFF_BITS), key=lambda s: (lens[s], -counts[s], s))
        lens[s] += 1
        kraft -= 1 << (_HUFF_BITS - lens[s])
    while kraft < _HUFF_TABLE:
        room = _HUFF_TABLE - kraft
        cands = [s for s in present if lens[s] > 1 and (1 << (_HUFF_BITS - lens[s])) <= room]
        if not cands:
            break
        s = max(cands, key=lambda s: (counts[s], -s))  # largest count, ties by smallest symbol
        kraft += 1 << (_HUFF_BITS - lens[s])
        lens[s] -= 1
    return lens


def _canonical_codes(lens: list[int]) -> list[int]:
    codes = [0] * 256
    code = -1
    prev = 0
    for ln, s in sorted((ln, s) for s, ln in enumerate(lens) if ln):
        code = 0 if code < 0 else (code + 1) << (ln - prev)
        codes[s] = code
        prev = ln
    return codes


def _substream_bounds(n: int):
    q = -(-n // 4)
    return [(min(j * q, n), min((j + 1) * q, n)) for j in range(4)]


def _huffman_size(plane: np.ndarray, lens: list[int]) -> int:
    lens_arr = np.asarray(lens, dtype=np.int64)
    size = _HUFF_HEADER
    for lo, hi in _substream_bounds(plane.size):
        if hi > lo:
            bits = int(np.dot(np.bincount(plane[lo:hi], minlength=256), lens_arr))
            size += (bits + 7) >> 3
    return size


def _huffman_encode(plane: np.ndarray, lens: list[int]) -> bytes:
    codes = _canonical_codes(lens)
    table = bytearray(128)
    for s, ln in enumerate(lens):
        table[s >> 1] |= ln << (4 * (s & 1))
    bitrows = np.zeros((256, _HUFF_BITS), np.uint8)
    maskrows = np.zeros((256, _HUFF_BITS), bool)
    for s, ln in enumerate(lens):
        for j in range(ln):
            bitrows[s, j] = (codes[s] >> (ln - 1 - j)) & 1
            maskrows[s, j] = True
    streams = []
    block = 1 << 18
    for lo, hi in _substream_bounds(plane.size):
        parts = []
        carry = np.zeros(0, np.uint8)
        for b in range(lo, hi, block):
            sym = plane[b:min(b + block, hi)]
            bits = bitrows[sym][maskrows[sym]]
            if carry.size:
                bits = np.concatenate((carry, bits))
            full = bits.size & ~7
            parts.append(np.packbits(bits[:full], bitorder="little").tobytes())
            carry = bits[full:]
        if carry.size:
            parts.append(np.packbits(carry, bitorder="little").tobytes())
        streams.append(b"".join(parts))
    return b"".join([bytes(table), struct.pack("<III", *(len(s) for s in streams[:3]))] + streams)


def _huffman_decode(stream: np.ndarray, n: int) -> np.ndarray:
    """Decode a Huffman stream (section 6) into n bytes; a broken rule raises R.RuleError."""
    size = stream.size
    if size < _HUFF_HEADER:
        raise R.RuleError(R.HUF_SHORT, size)
    table = stream[:128]
    lens = np.empty(256, np.uint8)
    lens[0::2] = table & 0x0F
    lens[1::2] = table >> 4
    bad = np.flatnonzero(lens > _HUFF_BITS)
    if bad.size:
        s = int(bad[0])
        raise R.RuleError(R.HUF_LEN, int(lens[s]), s)
    present = np.flatnonzero(lens)
    if present.size < 2:
        raise R.RuleError(R.HUF_FEW, int(present.size))
    kraft = int(np.sum(np.left_shift(1, _HUFF_BITS - lens[present].astype(np.int64))))
    if kraft != _HUFF_TABLE:
        raise R.RuleError(R.HUF_KRAFT, kraft)
    s0, s1, s2 = struct.unpack("<III", stream[128:140].tobytes())
    s3 = size - _HUFF_HEADER - s0 - s1 - s2
    if s3 < 0:
        raise R.RuleError(R.HUF_SIZES, s0 + s1 + s2, size - _HUFF_HEADER)
    lens_list = lens.tolist()
    codes = _canonical_codes(lens_list)
    lut_sym = np.zeros(_HUFF_TABLE, np.uint8)
    lut_len = np.zeros(_HUFF_TABLE, np.uint8)
    for s in present.tolist():
        ln = lens_list[s]
        lo = codes[s] << (_HUFF_BITS - ln)
        hi = (codes[s] + 1) << (_HUFF_BITS - ln)
        lut_sym[lo:hi] = s
        lut_len[lo:hi] = ln

    out = np.empty(n, np.uint8)
    off = _HUFF_HEADER
    for j, ((lo, hi), sz) in enumerate(zip(_substream_bounds(n), (s0, s1, s2, s3))):
        out[lo:hi] = _huffman_substream(stream[off:off + sz], hi - lo, lut_sym, lut_len, j)
        off += sz
    return out


def _huffman_substream(buf: np.ndarray, count: int, lut_sym, lut_len, j: int) -> np.ndarray:
    nbytes = buf.size
    nbits = 8 * nbytes
    if count == 0:
        if nbytes:
            raise R.RuleError(R.HUF_LEFTOVER, j, nbytes, 0)
        return np.zeros(0, np.uint8)
    if count > nbits:  # every code is at least one bit long
        raise R.RuleError(R.HUF_EARLY, j, count, nbytes)
    # the 11-bit window starting at every bit position (bits past the end read as zero)
    bits = np.zeros(nbits + _HUFF_BITS, np.uint8)
    bits[:nbits] = np.unpackbits(buf, bitorder="little")
    win = np.zeros(nbits, np.uint16)
    for b in range(_HUFF_BITS):
        win <<= 1
        win |= bits[b:b + nbits]
    # step[b]: the length of the code starting at bit b; 0 past the end, where the chase stops moving
    step = lut_len[win].tolist()
    step.extend([0] * _HUFF_BITS)
    starts = [0] * count
    pos = 0
    for i in range(count):
        starts[i] = pos
        pos += step[pos]
    last = starts[-1]
    if last >= nbits or pos > nbits:
        raise R.RuleError(R.HUF_EARLY, j, count, nbytes)
    used = (pos + 7) >> 3
    if used != nbytes:
        raise R.RuleError(R.HUF_LEFTOVER, j, nbytes - used, used)
    return lut_sym[win[np.asarray(starts, dtype=np.int64)]]


# --------------------------------------------------------------------------------------------------
# rANS (section 7 and the normalisation rule of docs/native-api.md)
# --------------------------------------------------------------------------------------------------
def _rans_frequencies(counts: list[int], n: int) -> list[int]:
    """12-bit frequencies (sum 4096, every present symbol >= 1) for the counts of an n-byte plane.

    The remainder goes one unit at a time where count/freq is largest, the excess is taken where it is
    smallest among freq > 1 (ties: the smallest symbol), exactly as docs/native-api.md; a heap of exact
    ratios finds each pick without rescanning the 256 symbols.
    """
    freq = [max(1, c * _RANS_M // n) if c else 0 for c in counts]
    total = sum(freq)
    if total < _RANS_M:
        heap = [(-Fraction(c, f), s) for s, (c, f) in enumerate(zip(counts, freq)) if c]
        heapq.heapify(heap)
        for _ in range(_RANS_M - total):
            _, s = heapq.heappop(heap)
            freq[s] += 1
            heapq.heappush(heap, (-Fraction(counts[s], freq[s]), s))
    elif total > _RANS_M:
        heap = [(Fraction(c, f), s) for s, (c, f) in enumerate(zip(counts, freq)) if f > 1]
        heapq.heapify(heap)
        for _ in range(total - _RANS_M):
            _, s = heapq.heappop(heap)
            freq[s] -= 1
            if freq[s] > 1:
                heapq.heappush(heap, (Fraction(counts[s], freq[s]), s))
    return freq


def _rans_table(freq: list[int]) -> bytes:
    """The frequency table: 256 minimal LEB128 varints (1 byte below 128, else 2)."""
    out = bytearray()
    for f in freq:
        if f < 128:
            out.append(f)
        else:
            out += bytes((0x80 | (f & 0x7F), f >> 7))
    return bytes(out)


def _rans_encode(plane: np.ndarray, counts: list[int], limit: int) -> bytes | None:
    """The rANS stream of an n >= 1 byte plane (its byte counts given), or None when it would exceed
    ``limit`` bytes.

    State j codes the symbols i = j, j+8, ... on its own; the words of all states share one stream in
    the order the decoder reads them: by symbol index.  Each state's loop therefore records, per
    symbol, the word emitted before coding it (or -1), and the stream is every recorded word in symbol
    order.
    """
    n = plane.size
    freq = _rans_frequencies(counts, n)
    table = _rans_table(freq)
    head = len(table) + 4 * _RANS_STATES
    if head > limit:
        return None
    max_words = (limit - head) // 2
    cum = 0
    sym = []  # per symbol: (freq, 4096 - freq, freq << 20, cum)
    for f in freq:
        sym.append((f, _RANS_M - f, f << 20, cum))
        cum += f
    emitted = np.empty(n, np.int32)  # the word emitted before coding symbol i, -1 for none
    states = [_RANS_L] * _RANS_STATES
    nwords = 0
    for j in range(min(_RANS_STATES, n)):
        x = _RANS_L
        words: list[int] = []
        put = words.append
        for s in plane[j::_RANS_STATES][::-1].tolist():
            f, g, lim, c = sym[s]
            if x >= lim:  # x < 2^32 and lim >= 2^20: one word brings x below lim
                put(x & 0xFFFF)
                x >>= 16
            else:
                put(-1)
            # ((x // f) << 12) + x % f + c, with x % f = x - (x // f) * f
            x += x // f * g + c
        states[j] = x
        emitted[j::_RANS_STATES] = words[::-1]
        nwords += len(words) - words.count(-1)
        if nwords > max_words:
            return None
    stream = emitted[emitted >= 0].astype("<u2")
    return b"".join((table, struct.pack(f"<{_RANS_STATES}I", *states), stream.tobytes()))


def _rans_decode(stream: np.ndarray, n: int) -> np.ndarray:
    """Decode a rANS stream (section 7) into n bytes; a broken rule raises R.RuleError."""
    raw = stream.tobytes()
    size = len(raw)
    freq: list[int] = []
    pos = 0
    for s in range(256):
        if pos >= size:
            raise R.RuleError(R.RANS_TABLE, s, size)
        v = raw[pos]
        pos += 1
        if v & 0x80:
            if pos >= size:
                raise R.RuleError(R.RANS_TABLE, s, size)
            hi = raw[pos]
            pos += 1
            if hi == 0:
                raise R.RuleError(R.RANS_VARINT, s)
            v = (v & 0x7F) | (hi << 7)
        if v > _RANS_M:
            raise R.RuleError(R.RANS_FREQ, s, v)
        freq.append(v)
    total = sum(freq)
    if total != _RANS_M:
        raise R.RuleError(R.RANS_SUM, total)
    if size - pos < 4 * _RANS_STATES:
        raise R.RuleError(R.RANS_STATES, size - pos)
    xs = list(struct.unpack_from(f"<{_RANS_STATES}I", raw, pos))
    pos += 4 * _RANS_STATES
    for j, x in enumerate(xs):
        if x < _RANS_L:
            raise R.RuleError(R.RANS_STATE_LOW, j, x)
    if (size - pos) & 1:
        raise R.RuleError(R.RANS_ODD, size - pos)

    # per slot (x mod 4096): (its symbol, the symbol's frequency, slot - cum[symbol])
    f_arr = np.asarray(freq, np.int64)
    slot_sym = np.repeat(np.arange(256, dtype=np.int64), f_arr)
    cum = np.cumsum(f_arr) - f_arr
    slots = list(zip(slot_sym.tolist(), f_arr[slot_sym].tolist(), (np.arange(_RANS_M) - cum[slot_sym]).tolist()))
    words = iter(np.frombuffer(raw, "<u2", offset=pos).tolist())
    word = words.__next__
    out = bytearray()
    put = out.append
    j = 0
    try:
        for _ in range(n):
            x = xs[j]
            s, f, bias = slots[x & (_RANS_M - 1)]
            put(s)
            x = f * (x >> _RANS_BITS) + bias
            if x < _RANS_L:  # x >= 16 here, so one word brings it back to >= 2^16
                x = (x << 16) | word()
            xs[j] = x
            j = (j + 1) & (_RANS_STATES - 1)
    except StopIteration:
        raise R.RuleError(R.RANS_WORDS_OUT, n) from None
    left = sum(1 for _ in words)
    if left:
        raise R.RuleError(R.RANS_WORDS_LEFT, left, n)
    for j, x in enumerate(xs):
        if x != _RANS_L:
            raise R.RuleError(R.RANS_FINAL, j, x)
    return np.frombuffer(out, np.uint8)


# --------------------------------------------------------------------------------------------------
# encoder
# --------------------------------------------------------------------------------------------------
def _encode_plane(plane: np.ndarray, mode: str, cctx) -> tuple[int, bytes]:
    """(codec, stream) of one plane: the candidates of docs/native-api.md in the native order.

    stored/fill, then zstd ('zstd', 'max', 'zstd_huffman'), huffman (every mode but 'zstd'), rans ('rans', 'max');
    each must be strictly smaller than the best so far, and rans at most floor(best x 127 / 128).
    """
    n = plane.size
    counts = np.bincount(plane, minlength=256)
    distinct = int(np.count_nonzero(counts))
    if distinct == 1:
        # fill is 1 byte, which no other codec can beat; stored wins the tie at n == 1
        if n == 1:
            return spec.CODEC_STORED, plane.tobytes()
        return spec.CODEC_FILL, plane[:1].tobytes()
    best_size, best_codec, best_blob = n, spec.CODEC_STORED, None
    if mode in ("zstd", "max", "zstd_huffman"):
        frame = cctx.compress(plane.tobytes())
        if len(frame) < best_size:
            best_size, best_codec, best_blob = len(frame), spec.CODEC_ZSTD, frame
    lens = None
    if mode != "zstd" and n > _HUFF_HEADER:  # a Huffman stream is longer than its 140-byte header
        lens = _huffman_lengths(counts.tolist())
        hsize = _huffman_size(plane, lens)
        if hsize < best_size:
            best_size, best_codec, best_blob = hsize, spec.CODEC_HUFFMAN, None
    if mode in ("rans", "max"):
        # rans decodes at about half huffman's speed: it must save 1/128 of the best so far
        limit = best_size // 128 * 127 + (best_size % 128) * 127 // 128
        if limit >= _RANS_MIN_SIZE:
            blob = _rans_encode(plane, counts.tolist(), limit)
            if blob is not None:
                best_size, best_codec, best_blob = len(blob), _CODEC_RANS, blob
    if best_codec == spec.CODEC_STORED:
        return best_codec, plane.tobytes()
    if best_codec == spec.CODEC_HUFFMAN:
        best_blob = _huffman_encode(plane, lens)
        assert len(best_blob) == best_size
    return best_codec, best_blob


def _dtype_info(dtype: str) -> tuple[int, int]:
    try:
        return spec.DTYPES[dtype]
    except (KeyError, TypeError):
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(spec.DTYPES)}") from None


def encode_planes(src, dtype: str, chunk_elems: int, mode: str, level: int, threads: int,
                  f16_planes: bool = False):
    """Encode a tensor's raw little-endian bytes with the 'planes' encoding.

    Returns (stored bytes of all chunks back to back, [(codecs, plane_sizes, checksum) per chunk]).
    ``threads`` is accepted for API parity; the output never depends on it.
    """
    _, itemsize = _dtype_info(dtype)
    if mode not in _MODES:
        raise ConfigError(f"mode {mode!r} is not one of {list(_MODES)}")
    if not isinstance(chunk_elems, int) or chunk_elems < 1 or chunk_elems * itemsize > spec.MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunk_elems {chunk_elems!r} must be an int >= 1 with chunk_elems x itemsize {itemsize} <= "
            f"{spec.MAX_CHUNK_BYTES} (16 MiB)"
        )
    u8 = _u8(src, "src")
    if u8.size % itemsize:
        raise ConfigError(f"src: {u8.size} bytes is not a multiple of the {dtype} itemsize {itemsize}")
    numel = u8.size // itemsize
    if numel > spec.MAX_NUMEL:
        raise LimitError(f"src: numel {numel} exceeds the limit 2^48")
    cctx = None
    if mode in ("zstd", "max", "zstd_huffman"):
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    planes = _split_planes(u8, dtype, itemsize, f16_planes)
    out: list[bytes] = []
    meta: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []
    for start in range(0, numel, chunk_elems):
        stop = min(start + chunk_elems, numel)
        codecs, sizes, blobs = [], [], []
        for p in range(itemsize):
            codec, blob = _encode_plane(planes[p, start:stop], mode, cctx)
            codecs.append(codec)
            sizes.append(len(blob))
            blobs.append(blob)
        chunk = b"".join(blobs)
        out.append(chunk)
        meta.append((tuple(codecs), tuple(sizes), xxhash.xxh3_64_intdigest(chunk)))
    return b"".join(out), meta


def checksum_chunks(src, chunk_bytes: int, threads: int) -> list[int]:
    """XXH3_64 of each ``chunk_bytes`` slice of ``src`` (the last one may be shorter)."""
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes {chunk_bytes!r} must be an int >= 1")
    u8 = _u8(src, "src")
    return [xxhash.xxh3_64_intdigest(u8[o:o + chunk_bytes]) for o in range(0, u8.size, chunk_bytes)]


# --------------------------------------------------------------------------------------------------
# decoder
# --------------------------------------------------------------------------------------------------
def _tensor_geometry(t: TensorInfo) -> tuple[int, int, int]:
    """(itemsize, numel, nbytes) of a TensorInfo, after checking its tensor-level fields (the chunks'
    own rules are checked chunk by chunk, in the native order: _check_chunk)."""
    where = f"tensor {t.name!r}"
    if t.dtype not in spec.DTYPES:
        raise UnsupportedError(f"{where}: dtype {t.dtype!r} is not a known dtype")
    if t.encoding not in ("raw", "planes"):
        raise UnsupportedError(f"{where}: encoding {t.encoding!r} is not 'raw' or 'planes'")
    _, itemsize = spec.DTYPES[t.dtype]
    numel = _numel(t.shape, where)
    if t.chunk_elems < 1:
        raise LimitError(f"{where}: chunk_elems {t.chunk_elems} must be >= 1")
    expected = -(-numel // t.chunk_elems)
    if len(t.chunks) != expected:
        raise LayoutError(f"{where}: {len(t.chunks)} chunks, ceil(numel {numel} / chunk_elems {t.chunk_elems}) "
                          f"= {expected} expected (chunk_count)")
    for k, c in enumerate(t.chunks):
        if t.encoding == "planes" and (len(c.codecs) != itemsize or len(c.plane_sizes) != itemsize):
            raise LayoutError(f"{where} chunk {k}: {len(c.codecs)} codecs / {len(c.plane_sizes)} plane sizes, "
                              f"{itemsize} planes expected")
    return itemsize, numel, numel * itemsize


def _chunk_bytes(fb: np.ndarray, base: int, c: ChunkInfo, t: TensorInfo, k: int) -> np.ndarray:
    rel = c.offset - base
    if c.offset < base or rel > fb.size or c.size > fb.size - rel:
        raise TruncatedError(
            f"tensor {t.name!r} chunk {k}: bytes [{c.offset}, {c.offset + c.size}) are not in the buffer, which "
            f"holds [{base}, {base + fb.size})")
    return fb[rel:rel + c.size]


def _check_chunk(t: TensorInfo, k: int, c: ChunkInfo, n_k: int, itemsize: int) -> None:
    """The structure rules of one chunk that the decoders re-check (sections 3 and 5), in csrc's order."""
    if t.encoding == "raw":
        if c.size != n_k * itemsize:
            raise R.error(R.RAW_SIZE, R.where(t.name, k), c.size, n_k, itemsize)
        return
    total = 0
    for p, (codec, size) in enumerate(zip(c.codecs, c.plane_sizes)):
        rule = None
        if codec not in _CODECS:
            rule = R.PLANE_CODEC
        elif size > n_k:
            rule = R.PLANE_SIZE_MAX
        elif codec == spec.CODEC_STORED and size != n_k:
            rule = R.STORED_SIZE
        elif codec == spec.CODEC_FILL and size != 1:
            rule = R.FILL_SIZE
        elif size == 0:
            rule = R.PLANE_SIZE_ZERO
        if rule is not None:
            a = codec if rule == R.PLANE_CODEC else size
            raise R.error(rule, R.where(t.name, k, p), a, n_k)
        total += size
    if total != c.size:
        raise R.error(R.PLANES_SUM, R.where(t.name, k), total, c.size)


def _check_stored(stored: np.ndarray, c: ChunkInfo, t: TensorInfo, k: int) -> None:
    actual = xxhash.xxh3_64_intdigest(stored)
    if actual != c.checksum:
        raise R.error(R.CHECKSUM, R.where(t.name, k), c.checksum, actual)


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 << 10


def _zstd_check_frame(frame: bytes, n: int) -> None:
    """The frame rules of codec 2 (section 5), checked on the frame's headers before libzstd decodes it:
    exactly one Zstandard frame, no reserved bit, no dictionary, content size n declared, every block
    within Block_Maximum_Size and the stream, nothing after the frame (csrc: ts_zstd_check_frame)."""
    sz = len(frame)
    if sz < 4:
        raise R.RuleError(R.ZSTD_SHORT, sz)
    magic = int.from_bytes(frame[:4], "little")
    if magic != _ZSTD_MAGIC:
        raise R.RuleError(R.ZSTD_MAGIC, magic)
    if sz < 5:
        raise R.RuleError(R.ZSTD_HEADER, 5, sz)
    fhd = frame[4]
    fcs_flag, single, csum = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1
    dl = (0, 1, 2, 4)[fhd & 3]
    fl = (single, 2, 4, 8)[fcs_flag]
    hsize = 5 + (1 - single) + dl + fl
    if fhd & 0x08:
        raise R.RuleError(R.ZSTD_RESERVED, fhd)
    if sz < hsize:
        raise R.RuleError(R.ZSTD_HEADER, hsize, sz)
    q = 5
    window = 0
    if not single:
        wd = frame[q]
        q += 1
        wlog = 10 + (wd >> 3)
        window = (1 << wlog) + ((1 << wlog) >> 3) * (wd & 7)
    did = int.from_bytes(frame[q:q + dl], "little")
    q += dl
    if did:
        raise R.RuleError(R.ZSTD_DICT, did)
    if not fl:
        raise R.RuleError(R.ZSTD_NO_SIZE, 0, n)
    fcs = int.from_bytes(frame[q:q + fl], "little") + (256 if fl == 2 else 0)
    if fcs != n:
        raise R.RuleError(R.ZSTD_SIZE, fcs, n)
    if single:
        window = fcs
    bmax = min(window, _ZSTD_BLOCK_MAX)
    pos, k = hsize, 0
    while True:
        if sz - pos < 3:
            raise R.RuleError(R.ZSTD_TRUNCATED, k, sz)
        bh = int.from_bytes(frame[pos:pos + 3], "little")
        btype, bsize = (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise R.RuleError(R.ZSTD_BLOCK_TYPE, k)
        if bsize > bmax:
            raise R.RuleError(R.ZSTD_BLOCK_SIZE, k, bsize, bmax)
        body = 1 if btype == 1 else bsize
        if sz - pos - 3 < body:
            raise R.RuleError(R.ZSTD_TRUNCATED, k, sz)
        pos += 3 + body
        k += 1
        if bh & 1:
            break
    if csum:
        if sz - pos < 4:
            raise R.RuleError(R.ZSTD_TRUNCATED, k, sz)
        pos += 4
    if pos != sz:
        raise R.RuleError(R.ZSTD_TRAILING, pos, sz - pos)


def _decode_plane(blob: np.ndarray, codec: int, n: int) -> np.ndarray:
    """Decode one plane stream (its structure already checked); a broken rule raises R.RuleError."""
    if codec == spec.CODEC_STORED:
        return blob
    if codec == spec.CODEC_FILL:
        return np.full(n, blob[0], np.uint8)
    if codec == spec.CODEC_ZSTD:
        frame = blob.tobytes()
        _zstd_check_frame(frame, n)
        try:
            out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=n)
        except zstandard.ZstdError:
            raise R.RuleError(R.ZSTD_DECODE) from None
        if len(out) != n:
            raise R.RuleError(R.ZSTD_LENGTH, len(out), n)
        return np.frombuffer(out, np.uint8)
    if codec == spec.CODEC_HUFFMAN:
        return _huffman_decode(blob, n)
    if codec == _CODEC_RANS:
        return _rans_decode(blob, n)
    raise R.RuleError(R.PLANE_CODEC, codec)


def decode_stream(codec: int, stream, n: int, where: str = "stream") -> bytes:
    """Decode one plane stream with `codec` into n bytes (tests and the differential test): the stream
    rules of sections 5-7, without the chunk record's 1 <= size <= n rule (csrc: ts_decode_stream)."""
    blob = _u8(stream, "stream")
    if blob.size == 0 and codec != spec.CODEC_STORED:
        raise LayoutError(f"{where}: an empty stream (every plane holds at least 1 byte)")
    try:
        if codec == spec.CODEC_STORED and blob.size != n:
            raise R.RuleError(R.STORED_SIZE, blob.size, n)
        if codec == spec.CODEC_FILL and blob.size != 1:
            raise R.RuleError(R.FILL_SIZE, blob.size)
        return _decode_plane(blob, codec, n).tobytes()
    except R.RuleError as e:
        raise e.at(where) from None


def _decode_chunk(fb: np.ndarray, base: int, t: TensorInfo, k: int, n_k: int, itemsize: int,
                  verify: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored bytes, (itemsize, n_k) decoded planes or None for raw) of chunk k, every rule checked in
    csrc's order: structure, stored checksum, then each plane."""
    c = t.chunks[k]
    stored = _chunk_bytes(fb, base, c, t, k)
    _check_chunk(t, k, c, n_k, itemsize)
    if verify:
        _check_stored(stored, c, t, k)
    if t.encoding == "raw":
        return stored, None
    planes = np.empty((itemsize, n_k), np.uint8)
    off = 0
    for p, (codec, size) in enumerate(zip(c.codecs, c.plane_sizes)):
        try:
            planes[p] = _decode_plane(stored[off:off + size], codec, n_k)
        except R.RuleError as e:
            raise e.at(R.where(t.name, k, p)) from None
        off += size
    return stored, planes


def _check_decoded(decoded: np.ndarray, c: ChunkInfo, t: TensorInfo, k: int) -> None:
    """The decoded checksum (format 1.1, feature bit 0) of a chunk's decoded element bytes."""
    if c.decoded_checksum is None:
        return
    actual = xxhash.xxh3_64_intdigest(decoded)
    if actual != c.decoded_checksum:
        raise R.error(R.DECODED_CHECKSUM, R.where(t.name, k), c.decoded_checksum, actual)


def _dest_view(dst, nbytes: int, name: str) -> np.ndarray:
    where = f"tensor {name!r}: destination"
    try:
        mv = memoryview(dst)
    except TypeError:
        raise DestinationError(f"{where}: {type(dst).__name__} does not support the buffer protocol") from None
    if mv.readonly:
        raise DestinationError(f"{where} is read-only")
    if not mv.c_contiguous:
        raise DestinationError(f"{where} is not C-contiguous")
    if mv.nbytes != nbytes:
        raise DestinationError(f"{where} holds {mv.nbytes} bytes, the tensor decodes to exactly {nbytes}")
    if nbytes == 0:
        return np.zeros(0, np.uint8)
    arr = np.frombuffer(mv, dtype=np.uint8)
    if not arr.flags.writeable:
        raise DestinationError(f"{where} is read-only")
    return arr


def decode_into(file_buf, jobs, verify: bool, threads: int, base: int = 0, f16_planes: bool = False) -> None:
    """Decode each (TensorInfo, dst) job from ``file_buf`` (the file's bytes from offset ``base``).
    f16_planes: the file has the "float16 exponent planes" feature."""
    fb = _u8(file_buf, "file_buf")
    prepared = []
    for t, dst in jobs:
        itemsize, numel, nbytes = _tensor_geometry(t)
        prepared.append((t, itemsize, numel, _dest_view(dst, nbytes, t.name)))
    for t, itemsize, numel, out in prepared:
        for k, c in enumerate(t.chunks):
            _chunk_bytes(fb, base, c, t, k)
    for t, itemsize, numel, out in prepared:
        for k, c in enumerate(t.chunks):
            start = k * t.chunk_elems
            n_k = min(t.chunk_elems, numel - start)
            target = out[start * itemsize:(start + n_k) * itemsize]
            stored, planes = _decode_chunk(fb, base, t, k, n_k, itemsize, verify)
            if planes is None:
                if verify:
                    _check_decoded(stored, c, t, k)
                target[:] = stored
                continue
            _merge_planes(planes, t.dtype, itemsize, target, f16_planes)
            if verify:
                _check_decoded(target, c, t, k)


def validate_chunks(file_buf, tensors, threads: int, base: int = 0, f16_planes: bool = False) -> None:
    """Check every codec rule of every chunk (sections 3, 5-7): structure, the stored checksum, a full
    decode into scratch memory and the decoded checksum where the chunk has one.  Raises the error of
    the first broken chunk, as decode_into would."""
    fb = _u8(file_buf, "file_buf")
    prepared = [(t, *_tensor_geometry(t)[:2]) for t in tensors]
    for t, itemsize, numel in prepared:
        for k, c in enumerate(t.chunks):
            _chunk_bytes(fb, base, c, t, k)
    for t, itemsize, numel in prepared:
        for k, c in enumerate(t.chunks):
            n_k = min(t.chunk_elems, numel - k * t.chunk_elems)
            stored, planes = _decode_chunk(fb, base, t, k, n_k, itemsize, True)
            if planes is None:
                _check_decoded(stored, c, t, k)
            elif c.decoded_checksum is not None:
                merged = np.empty(n_k * itemsize, np.uint8)
                _merge_planes(planes, t.dtype, itemsize, merged, f16_planes)
                _check_decoded(merged, c, t, k)


def verify_chunks(file_buf, tensors, threads: int, base: int = 0) -> list[tuple[str, int]]:
    """(tensor name, chunk index) of every chunk whose XXH3_64 does not match its checksum."""
    fb = _u8(file_buf, "file_buf")
    for t in tensors:
        for k, c in enumerate(t.chunks):
            _chunk_bytes(fb, base, c, t, k)
    bad = []
    for t in tensors:
        itemsize, numel, _ = _tensor_geometry(t)
        for k, c in enumerate(t.chunks):
            stored = _chunk_bytes(fb, base, c, t, k)
            _check_chunk(t, k, c, min(t.chunk_elems, numel - k * t.chunk_elems), itemsize)
            if xxhash.xxh3_64_intdigest(stored) != c.checksum:
                bad.append((t.name, k))
    return bad


def _planes_range(t: TensorInfo, first: int, count: int) -> tuple[int, int, int]:
    """(itemsize, first element, element count) of chunks [first, first + count) of a 'planes' tensor."""
    if t.encoding != "planes":
        raise ConfigError(f"tensor {t.name!r}: decode_planes_into takes 'planes' tensors, this one is "
                          f"{t.encoding!r}")
    if t.dtype not in spec.DTYPES:
        raise UnsupportedError(f"tensor {t.name!r}: dtype {t.dtype!r} is not a known dtype")
    isz = spec.DTYPES[t.dtype][1]
    nchunks = len(t.chunks)
    if not (0 <= first and 0 <= count and first + count <= nchunks):
        raise ConfigError(f"tensor {t.name!r}: chunks [{first}, {first + count}) outside the tensor's "
                          f"{nchunks} chunks")
    if t.chunk_elems < 1:
        raise LimitError(f"tensor {t.name!r}: chunk_elems {t.chunk_elems} must be >= 1")
    numel = t.numel
    e0 = first * t.chunk_elems
    e1 = min((first + count) * t.chunk_elems, numel)
    if count and e0 >= numel:
        raise LayoutError(f"tensor {t.name!r}: chunk {first + count - 1} starts at element "
                          f"{(first + count - 1) * t.chunk_elems}, past numel {numel}")
    for c in t.chunks[first:first + count]:
        if len(c.codecs) != isz or len(c.plane_sizes) != isz:
            raise LayoutError(f"tensor {t.name!r}: {len(c.codecs)} codecs / {len(c.plane_sizes)} plane "
                              f"sizes, {isz} planes expected")
    return isz, e0, max(0, e1 - e0)


def decode_planes_into(file_buf, jobs, verify: bool, threads: int, base: int = 0,
                       f16_planes: bool = False) -> None:
    """Decode chunks of 'planes' tensors without regrouping: job = (TensorInfo, first_chunk, chunk_count,
    dst); dst (n x itemsize bytes, n = the elements of those chunks) receives plane p at [p*n, (p+1)*n).
    f16_planes only matters for the decoded checksum (taken over the regrouped element bytes)."""
    fb = _u8(file_buf, "file_buf")
    prepared = []
    for t, first, count, dst in jobs:
        isz, e0, n = _planes_range(t, first, count)
        out = _dest_view(dst, n * isz, t.name)
        prepared.append((t, first, count, isz, n, out))
    for t, first, count, isz, n, out in prepared:
        for k in range(first, first + count):
            _chunk_bytes(fb, base, t.chunks[k], t, k)
    for t, first, count, isz, n, out in prepared:
        for k in range(first, first + count):
            c = t.chunks[k]
            el = (k - first) * t.chunk_elems
            n_k = min(t.chunk_elems, n - el)
            _, planes = _decode_chunk(fb, base, t, k, n_k, isz, verify)
            for p in range(isz):
                out[p * n + el:p * n + el + n_k] = planes[p]
            if verify and c.decoded_checksum is not None:
                merged = np.empty(n_k * isz, np.uint8)
                _merge_planes(planes, t.dtype, isz, merged, f16_planes)
                _check_decoded(merged, c, t, k)
